"""Forward-proxy mode: the edge as an organisation's outbound proxy (lists, policy, activity log, report)."""
