"""The runtime processes of an instance: two per LLM (and per tensor-parallel rank), their command
lines and rendezvous, and the instance's ends of the channels to them (``ipc.runtime``)."""

from __future__ import annotations

import zmq

from muxserve.config import LLMConfig, MuxServeConfig
from muxserve.flexstore.auth import SECRET_ENV
from muxserve.instance.mps import mps_env
from muxserve.instance.options import InstanceOptions
from muxserve.instance.processes import Child, ProcessGroup
from muxserve.instance.supervisor import RuntimeGroup
from muxserve.ipc import runtime as M
from muxserve.ipc.runtime import Phase


def runtime_name(llm: str, phase: Phase, rank: int, tp: int) -> str:
    """A runtime process's name (logs, readiness): ``llm/phase``, plus ``/rankN`` under tensor parallelism."""
    return f"{llm}/{phase.value}" + (f"/rank{rank}" if tp > 1 else "")


def max_num_seqs(config: MuxServeConfig, options: InstanceOptions, llm: LLMConfig) -> int:
    """Sequences of one LLM at most: its own limit, else the flag's, else the config's."""
    return llm.max_num_seqs or options.max_num_seqs or config.max_num_seqs


class Runtimes:
    """Starts runtime processes (``spawn``, the supervisor's way to start a group) and talks to them.

    Every address is in the instance's private directory ``run_dir``; a tensor-parallel group meets
    at a fresh file there for each start, or, with ``options.dist_base_port``, the k-th group at
    ``dist_host:dist_base_port + k``.
    """

    def __init__(self, config: MuxServeConfig, options: InstanceOptions, run_dir, flexstore_address: str,
                 secret: str, processes: ProcessGroup):
        self.config = config
        self.options = options
        self.run_dir = run_dir
        self.flexstore_address = flexstore_address
        self.secret = secret
        self.processes = processes
        self.links: dict[tuple[str, Phase], M.JobSender] = {}
        self._ctx = zmq.Context()
        self._results: M.ResultReceiver | None = None
        self._tp_groups = [(m.name, phase) for m in config.models for phase in Phase if m.tensor_parallel_size > 1]

    @property
    def results_address(self) -> str:
        return f"ipc://{self.run_dir}/results"

    def bind(self) -> None:
        """Bind the results socket and one job link per (LLM, phase), before any runtime starts."""
        self._results = M.ResultReceiver(self._ctx, self.results_address)
        for i, m in enumerate(self.config.models):
            for phase in Phase:
                addresses = [self._jobs_address(i, phase, rank) for rank in range(m.tensor_parallel_size)]
                self.links[(m.name, phase)] = M.JobSender(self._ctx, addresses)

    def _jobs_address(self, index: int, phase: Phase, rank: int) -> str:
        return f"ipc://{self.run_dir}/{index}-{phase.value}" + (f"-{rank}" if rank else "")

    def spawn(self, group: RuntimeGroup) -> list[Child]:
        """Start the processes of one (LLM, phase): one per tensor-parallel rank."""
        o = self.options
        index = self.config.model_names.index(group.llm)
        m = self.config.models[index]
        if group.phase is Phase.PREFILL:
            pct = max(10, m.prefill_percentage - o.policy.prefill_mps_reduction)
        else:
            pct = m.decode_percentage
        tp = m.tensor_parallel_size
        args = ["-m", "muxserve.flexserver", "--llm", m.name, "--phase", group.phase.value,
                "--flexstore", self.flexstore_address, "--results", self.results_address,
                "--max-num-seqs", str(max_num_seqs(self.config, o, m))]
        if tp > 1:
            args += ["--tp-size", str(tp), "--dist-init-method", self._rendezvous(group)]
        if o.enforce_eager:
            args.append("--enforce-eager")
        env = {**mps_env(o.mps_dir, pct), SECRET_ENV: self.secret}
        return [self.processes.start(runtime_name(m.name, group.phase, rank, tp),
                                     [*args, "--jobs", self._jobs_address(index, group.phase, rank),
                                      *(["--tp-rank", str(rank)] if tp > 1 else [])], env)
                for rank in range(tp)]

    def _rendezvous(self, group: RuntimeGroup) -> str:
        """Where the ranks of a tensor-parallel group meet: a fresh file per start, or an explicit port."""
        k = self._tp_groups.index(group.key)
        if self.options.dist_base_port is not None:
            return f"tcp://{self.options.dist_host}:{self.options.dist_base_port + k}"
        return f"file://{self.run_dir}/rendezvous-{k}-{group.starts}"

    @property
    def results(self) -> M.ResultReceiver:
        """Where every runtime's answers arrive (bound by ``bind``)."""
        return self._results

    def shutdown(self) -> None:
        """Ask every runtime still listening to exit."""
        for link in self.links.values():
            link.send(M.Shutdown())

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        if self._results is not None:
            self._results.close()
            self._results = None
        self.links = {}
        if not self._ctx.closed:
            self._ctx.term()
