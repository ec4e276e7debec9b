"""Workers on one machine: N edge processes sharing the listeners (SO_REUSEPORT) under a
supervisor (edgecli/supervisor.py), and the state they share through EDGE_RUNTIME_DIR."""
