"""Elastic memory: wake, offload, mapping and host-copy bandwidth of device ranges."""
