"""Scheduling of many LLMs on one mesh: ADBS and baselines, SM units, quotas, workloads, placement."""
