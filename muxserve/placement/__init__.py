"""Placement: which LLMs share which GPU mesh. The LLMs' sizes, the unit-throughput estimator, greedy and ILP placement, cost tables and the cost profiler."""
