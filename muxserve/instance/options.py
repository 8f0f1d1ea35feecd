"""How to run a model_config: the flags of the launcher and the server that are not part of the YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from muxserve.instance.supervisor import RestartPolicy
from muxserve.scheduler.policy import SchedulePolicy


@dataclass
class InstanceOptions:
    """How to run a config: the launcher's flags that are not part of the YAML."""

    policy: SchedulePolicy
    device: str = "cpu"  # cpu or cuda
    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None  # overrides the config's instance-wide value
    page_bytes: int = 16 * 1024
    mps_dir: str | None = None
    flexstore_address: str | None = None  # None: an ipc socket in the instance's private directory
    log_dir: Path | None = None
    rates: dict[str, float] = field(default_factory=dict)  # requests/s per LLM, for the quotas
    avg_seq_len: int = 416  # the original's default when the workload has no length stats
    enforce_eager: bool = False  # decode runtimes without CUDA graphs
    ready_timeout_s: float = 600.0
    # torch.distributed rendezvous of tensor-parallel runtimes: a file in the private directory,
    # or with dist_base_port the k-th group (an LLM's prefill or decode ranks) at dist_host:dist_base_port + k
    dist_host: str = "127.0.0.1"
    dist_base_port: int | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)  # what a dead runtime gets
