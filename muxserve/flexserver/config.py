"""What one runtime process is: its LLM and phase, its addresses, its limits, its tensor-parallel rank."""

from __future__ import annotations

import msgspec

from muxserve.ipc.runtime import Phase


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One runtime process: its LLM and phase, its addresses, its batch limit and its tensor-parallel rank.

    ``jobs_address`` and ``results_address`` are bound by the instance (this process connects).
    ``max_num_seqs`` is the largest decode batch (it sizes the page tables and the CUDA graphs);
    ``enforce_eager`` turns CUDA graphs off. Under tensor parallelism this process is rank
    ``tp_rank`` of ``tp_size``; the ranks of one (LLM, phase) form a torch.distributed group that
    meets at ``dist_init_method`` (file:// or tcp://).
    """

    llm: str
    phase: Phase
    flexstore_address: str
    jobs_address: str
    results_address: str
    attention_backend: str = "auto"
    max_num_seqs: int = 256
    enforce_eager: bool = False
    tp_size: int = 1
    tp_rank: int = 0
    dist_init_method: str | None = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"--tp-rank {self.tp_rank} must be in [0, --tp-size {self.tp_size})")
        if self.tp_size > 1 and not self.dist_init_method:
            raise ValueError("--tp-size > 1 needs --dist-init-method URL")

    @property
    def group(self) -> str:
        """The (LLM, phase) this process serves; what the scheduler calls the runtime."""
        return f"{self.llm}/{self.phase.value}"

    @property
    def name(self) -> str:
        """This process: the group, plus the rank under tensor parallelism."""
        return self.group if self.tp_size == 1 else f"{self.group}/rank{self.tp_rank}"
