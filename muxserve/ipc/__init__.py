"""What an instance's processes share: typed messages, dtypes and devices, the run directory, lifetime."""
