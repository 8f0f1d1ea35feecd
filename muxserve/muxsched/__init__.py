"""Thin entry modules that keep the original's commands working verbatim: workload_utils, placement, profile."""
