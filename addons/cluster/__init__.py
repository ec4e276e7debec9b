"""Many machines as one edge: membership, shared state, and the tiered cache over the nodes."""
