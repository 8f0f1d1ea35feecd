"""End-to-end experiments: power-law workloads, placement, MuxServe vs temporal vs spatial, analysis and report."""
