"""The engine alone: decode and prefill steps, kernels, GEMMs, tensor parallelism, offline throughput."""
