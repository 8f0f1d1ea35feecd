"""Workloads: generator (ShareGPT, power law, LMSYS traces), datasets, arrivals, models and workload files."""
