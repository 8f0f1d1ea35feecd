"""How to run a model_config: the flags of the launcher and the server that are not part of the YAML."""

from __future__ import annotations

from pathlib import Path

import msgspec

from muxserve.engine.kv_cache import DEFAULT_PAGE_BYTES
from muxserve.instance.supervisor import RestartPolicy
from muxserve.scheduler.policy import SchedulePolicy


class InstanceOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How to run a config: the launcher's and the server's flags that are not part of the YAML.

    Attributes:
        policy: the schedule approach (``scheduler.policy.POLICIES``).
        device: ``cpu`` or ``cuda``.
        max_num_batched_tokens: prompt tokens in one prefill job at most.
        max_num_seqs: sequences per LLM at most; overrides the config's instance-wide value.
        page_bytes: the KV page size.
        mps_dir: the MPS daemon's directory (None: no MPS).
        flexstore_address: None: an ipc socket in the instance's private directory.
        log_dir: where FlexStore and each runtime log (None: nowhere).
        rates, avg_seq_len: requests/s per LLM and the average request length, for the initial
            quotas (416: the original's default when the workload has no length statistics).
        enforce_eager: decode runtimes without CUDA graphs.
        ready_timeout_s: how long processes may take to start.
        dist_host, dist_base_port: torch.distributed rendezvous of tensor-parallel runtimes: a file in
            the private directory, or with ``dist_base_port`` the k-th group (an LLM's prefill or
            decode ranks) at ``dist_host:dist_base_port + k``.
        restart: what a dead runtime gets.
        offload_idle_s: offload an elastic LLM (``residency: elastic``) idle this long (None: only
            when asked, ``Instance.offload``); ``min_resident_s``: not before it was resident this long.
        granule_bytes, reserve_granules: the memory budget's mapping unit and the free KV granules
            kept mapped ahead of growth (instances with an elastic LLM only).
    """

    policy: SchedulePolicy
    device: str = "cpu"
    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None
    page_bytes: int = DEFAULT_PAGE_BYTES
    mps_dir: str | None = None
    flexstore_address: str | None = None
    log_dir: Path | None = None
    rates: dict[str, float] = msgspec.field(default_factory=dict)
    avg_seq_len: int = 416
    enforce_eager: bool = False
    ready_timeout_s: float = 600.0
    dist_host: str = "127.0.0.1"
    dist_base_port: int | None = None
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)
    offload_idle_s: float | None = None
    min_resident_s: float = 0.0
    granule_bytes: int = 2 * 1024 * 1024
    reserve_granules: int = 32
