"""Workloads: the generator (ShareGPT prompts, power-law rates, LMSYS traces), datasets, arrival processes, the models file and the workload file."""
