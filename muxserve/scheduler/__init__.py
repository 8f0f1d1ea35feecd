"""The multiplexed scheduler (ADBS, baselines): requests, quotas, SM units, wait bounds, stats, recovery, residency."""
