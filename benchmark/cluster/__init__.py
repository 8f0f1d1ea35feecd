"""The cluster front door: latency and throughput it adds."""
