"""The multiplexed scheduler (ADBS, baselines): requests, policies, quotas, SM units, statistics, recovery."""
