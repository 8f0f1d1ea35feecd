"""A runtime process: one LLM, one phase, one job at a time.

It attaches the LLM's weights and the KV pool from FlexStore (no copy, no loading of its own),
keeps each request's page list, runs the step a job asks for and answers with the sampled
tokens. It never decides what to run.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass

import torch
import zmq

from muxserve.engine.attention import make_attention, select_backend
from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.model_config import end_token_ids
from muxserve.engine.parallel import TensorParallel, join_group, leave_group
from muxserve.engine.runner import ModelRunner, StepOutput
from muxserve.engine.sampler import step_seed
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.structured import GuidedMatcher, GuidedSpec, grammar_cache_for
from muxserve.flexserver.config import RuntimeConfig
from muxserve.flexstore.client import FlexStoreClient
from muxserve.ipc import runtime as M
from muxserve.ipc.runtime import Phase

logger = logging.getLogger(__name__)


@dataclass
class _StepSeq:
    """What ModelRunner reads of a sequence (``runner.StepSequence``), rebuilt from a SeqInput."""

    req_id: str
    token_ids: list[int]  # prefill: every token to (re)compute; decode: the last sampled one
    num_tokens: int
    pages: list[int]
    params: SamplingParams
    step_seed: int | None = None  # sampler.step_seed of this step (seeded requests)
    num_output_tokens: int = 0
    matcher: GuidedMatcher | None = None

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]


class Runtime:
    """Serves the jobs of one (LLM, phase); ``secret`` is FlexStore's."""

    def __init__(self, config: RuntimeConfig, secret: str):
        self.config = config
        self._secret = secret
        self.pages: dict[str, list[int]] = {}  # request id -> its page list
        self.params: dict[str, SamplingParams] = {}
        self.matchers: dict[str, GuidedMatcher] = {}  # guided requests: where each stands in its grammar

    def attach(self) -> None:
        c = self.config
        client = FlexStoreClient(c.flexstore_address, self._secret)
        try:
            init = None
            if c.tp_size > 1:
                def init(device: torch.device) -> TensorParallel:
                    return join_group(c.tp_size, c.tp_rank, c.dist_init_method, device)
            self.attached = client.attach(c.llm, c.tp_rank, init)
        finally:
            client.close()
        a = self.attached
        if a.device.type == "cuda":
            torch.cuda.set_device(a.device)  # this process's GPU: Triton kernels launch on the current device
        self.parallel = a.model.parallel
        shard = a.model.shard  # this rank's heads
        backend = select_backend(c.attention_backend, a.device)
        attention = make_attention(backend, a.pool.view(a.layout), shard.num_heads, shard.num_kv_heads,
                                   shard.head_dim)
        # Decode steps replay CUDA graphs (on GPU with the Triton backend; under tensor parallelism
        # with the all-reduces inside); prefill runs eagerly.
        graphs = c.phase is Phase.DECODE and not c.enforce_eager
        self.runner = ModelRunner(a.model, a.layout, attention, a.device, max_num_seqs=c.max_num_seqs,
                                  max_model_len=a.spec.max_position_embeddings, cuda_graphs=graphs,
                                  parallel=self.parallel)
        if self.runner.graphs is not None and a.weights_mapped:
            # Capture every batch size before reporting ready: a first decode of a new size would
            # otherwise pay the capture (and Triton's compile) inside a request's latency. (A runtime
            # restarted while its elastic LLM is offloaded captures each size on first use instead:
            # its weights are not mapped now.)
            start = time.perf_counter()
            self.runner.graphs.capture_all()
            logger.info("%s captured decode graphs for batch sizes %s in %.1f s", c.name,
                        self.runner.graphs.captured, time.perf_counter() - start)

    def sync(self, kv_epoch: int, weights_epoch: int) -> None:
        """Follow FlexStore's ranges (elastic residency) up to these epochs. Addresses never change,
        so the model's parameters, the pool and captured CUDA graphs stay valid."""
        if self.attached.sync(kv_epoch, weights_epoch) and self.attached.device.type == "cuda":
            torch.cuda.synchronize(self.attached.device)

    def run_job(self, job: M.Job) -> StepOutput:
        if job.kv_epoch or job.weights_epoch:
            self.sync(job.kv_epoch, job.weights_epoch)
        for req_id in job.release:
            self.pages.pop(req_id, None)
            self.params.pop(req_id, None)
            self.matchers.pop(req_id, None)
        if job.release:
            self.runner.release(job.release)
        seqs = []
        for s in job.seqs:
            pages = self.pages.setdefault(s.req_id, [])
            if s.page_offset < len(pages):
                # A rewritten table (recompute after preemption): a new list object tells the
                # runner to rebuild this request's device page table instead of extending it.
                pages = self.pages[s.req_id] = pages[: s.page_offset]
            pages.extend(s.new_pages)
            params = self.params.get(s.req_id)
            if params is None or params.seed != s.seed or params.temperature != s.temperature:
                guided = GuidedSpec.from_wire(s.guided) if s.guided else None
                params = SamplingParams(max_tokens=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                        seed=s.seed, logprobs=s.logprobs, guided=guided, logit_bias=s.logit_bias)
                self.params[s.req_id] = params
            if s.prompt_logprobs != params.prompt_logprobs:
                params.prompt_logprobs = s.prompt_logprobs  # asked in a first prefill only
            seqs.append(_StepSeq(s.req_id, s.token_ids, s.num_tokens, pages, params,
                                 step_seed(s.seed, s.num_output_tokens), s.num_output_tokens,
                                 self._matcher(s, job.phase, params)))
        out = self.runner.execute(seqs, job.phase)
        if self.attached.device.type == "cuda":
            torch.cuda.synchronize(self.attached.device)
        return out

    def _matcher(self, s: M.SeqInput, phase: Phase, params: SamplingParams) -> GuidedMatcher | None:
        """The request's matcher, caught up with every token generated before this step."""
        if params.guided is None:
            return None
        matcher = self.matchers.get(s.req_id)
        if matcher is None:
            a = self.attached
            cache = grammar_cache_for(a.folder, a.spec.vocab_size, end_token_ids(a.folder, a.spec))
            matcher = self.matchers[s.req_id] = cache.matcher(params.guided)
        n = s.num_output_tokens
        if s.output_token_ids is not None:
            matcher.advance(s.output_token_ids)
        elif phase is Phase.PREFILL:
            matcher.advance(s.token_ids[len(s.token_ids) - n:] if n else [])
        elif matcher.num_accepted == n - 1:  # the last token came from the other runtime
            matcher.accept(s.token_ids[-1])
        if matcher.num_accepted != n:
            raise RuntimeError(f"request {s.req_id}: the grammar saw {matcher.num_accepted} of its {n} tokens")
        return matcher

    def serve(self) -> None:
        ctx = zmq.Context.instance()
        jobs = M.JobReceiver(ctx, self.config.jobs_address)
        results = M.ResultSender(ctx, self.config.results_address)
        name = self.config.name
        try:
            self.attach()
            results.send(M.Ready(name, os.getpid()))
            logger.info("%s ready (pid %d)", name, os.getpid())
            while True:
                msg = jobs.receive()
                if isinstance(msg, M.Shutdown):
                    break
                if isinstance(msg, M.Sync):
                    start = time.perf_counter()
                    self.sync(msg.kv_epoch, msg.weights_epoch)
                    if self.config.tp_rank == 0:
                        results.send(M.Synced(msg.notice_id, name, time.perf_counter() - start))
                    continue
                start = time.perf_counter()
                out = self.run_job(msg)
                if self.config.tp_rank == 0:  # every rank has the same tokens (rank 0's, broadcast)
                    results.send(job_result(msg.job_id, self.config.group, out, time.perf_counter() - start))
        except Exception as exc:  # report, then die: the launcher stops everything
            logger.exception("%s failed", name)
            results.send(M.Failure(name, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            jobs.close()
            results.close()
            if self.config.tp_size > 1:
                # Drop the decode graphs (they hold the communicator's kernels) before NCCL teardown.
                self.runner = None
                gc.collect()
                leave_group()


def _wire(lp: TokenLogprobs | None) -> M.TokenLogprob | None:
    if lp is None:
        return None
    return M.TokenLogprob(lp.token_id, lp.logprob, lp.rank, [t for t, _ in lp.top], [v for _, v in lp.top])


def job_result(job_id: int, runtime: str, out: StepOutput, seconds: float) -> M.JobResult:
    """A step's output as the typed answer to its job."""
    result = M.JobResult(job_id, runtime, out.tokens, seconds)
    if out.logprobs is not None:
        result.logprobs = [_wire(lp) for lp in out.logprobs]
    if out.prompt_logprobs is not None:
        result.prompt_logprobs = [None if p is None else [_wire(lp) for lp in p] for p in out.prompt_logprobs]
    if out.grammar_done is not None:
        result.grammar_done = [i for i, done in enumerate(out.grammar_done) if done]
    return result
