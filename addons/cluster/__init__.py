"""Many machines as one edge: membership, purge fan-out and the shared secret, through Redis."""
