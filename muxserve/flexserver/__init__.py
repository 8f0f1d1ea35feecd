"""Runtime processes: one prefill and one decode runtime per LLM, each running one job at a time."""
