"""Placement of LLMs on GPU meshes: model sizes, estimator, greedy and ILP, cost tables, profiler."""
