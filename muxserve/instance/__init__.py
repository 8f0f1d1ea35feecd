"""One instance (one GPU mesh): the Instance, its options, its processes (FlexStore, runtimes) and their supervision, MPS, and the command-line pieces shared by the launcher and the server."""

from muxserve.instance.instance import FlexStoreExited, Instance
from muxserve.instance.options import InstanceOptions

__all__ = ["FlexStoreExited", "Instance", "InstanceOptions"]
