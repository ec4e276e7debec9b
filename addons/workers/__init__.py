"""Several edge processes (workers) on one machine: the supervisor and the state they share."""
