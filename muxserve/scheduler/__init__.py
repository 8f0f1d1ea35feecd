"""The multiplexed scheduler (ADBS, baselines): requests, policies, quotas, SM units, wait bounds, stats, recovery."""
