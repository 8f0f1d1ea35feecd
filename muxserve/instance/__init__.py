"""One instance (one GPU mesh): the Instance, its options, processes, supervision, MPS and shared CLI flags."""

from muxserve.instance.instance import FlexStoreExited, Instance
from muxserve.instance.options import InstanceOptions

__all__ = ["FlexStoreExited", "Instance", "InstanceOptions"]
