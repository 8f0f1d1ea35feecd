"""FlexStore: the weights of every model, one head-wise paged KV pool and its page allocator, per device.

Runtimes attach the weights and the pool without a copy (POSIX shared memory on CPU, CUDA IPC
on GPU) and ask for pages over a typed ZeroMQ protocol (``protocol.py``), presenting the
instance's secret (``auth.py``).
"""

from muxserve.flexstore.client import (
    AttachedModel,
    FlexStoreAuthError,
    FlexStoreClient,
    FlexStoreDied,
    FlexStoreTimeout,
    attached_engine,
)
from muxserve.flexstore.config import FlexStoreConfig, ModelEntry
from muxserve.flexstore.manager import FlexStoreError, FlexStoreManager
from muxserve.flexstore.server import FlexStoreProcess, FlexStoreServer

__all__ = ["AttachedModel", "FlexStoreAuthError", "FlexStoreClient", "FlexStoreConfig", "FlexStoreDied",
           "FlexStoreError", "FlexStoreManager", "FlexStoreProcess", "FlexStoreServer", "FlexStoreTimeout",
           "ModelEntry", "attached_engine"]
