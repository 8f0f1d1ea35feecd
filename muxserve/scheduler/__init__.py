"""The multiplexed scheduler (ADBS and its baselines): requests, policies, KV quotas, SM units, statistics, runtime recovery."""
