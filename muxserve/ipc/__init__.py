"""What the processes of an instance share: the typed messages between them, dtypes and devices, the run directory, parent/child lifetime."""
