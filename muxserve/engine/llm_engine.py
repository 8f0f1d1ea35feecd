"""A single-model engine: weights, an in-process KV pool, continuous batching."""

from __future__ import annotations

import itertools
import logging

import msgspec
import torch

from muxserve.engine.attention import make_attention, select_backend
from muxserve.engine.kv_cache import DEFAULT_PAGE_BYTES, KVLayout, KVPool, PageAllocator, pool_pages
from muxserve.engine.loader import iter_weights, load_model
from muxserve.engine.model_config import ModelSpec, end_token_ids
from muxserve.engine.model_hub import resolve_model
from muxserve.engine.parallel import TensorParallel, shard_spec
from muxserve.engine.runner import ModelRunner
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.scheduler import Scheduler
from muxserve.engine.sequence import RequestLimits, Sequence, check_request
from muxserve.engine.structured import grammar_cache_for
from muxserve.ipc.devices import parse_device, parse_dtype

logger = logging.getLogger(__name__)

class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One engine: its model, where it runs and how large its KV pool and batches are.

    Attributes:
        model: a short name, a Hugging Face folder or a ``.gguf`` file (``model_hub``).
        dtype, device: ``float32``/``bfloat16``/``float16`` (or fp32, bf16, fp16); ``cpu``/``cuda``.
        kv_cache_bytes: the pool; default 512 MiB on CPU, ``gpu_memory_utilization`` on GPU
            (``kv_cache.pool_pages``). Under tensor parallelism each rank's own pool.
        page_bytes: the KV page size.
        max_num_seqs, max_num_batched_tokens: sequences in a batch, prompt tokens in a prefill
            (default: at least 2048 and the context).
        max_model_len: the context (at most the model's).
        attention_backend: ``auto`` (triton on CUDA, torch on CPU), ``torch`` or ``triton``.
        enforce_eager: no CUDA graphs for decode steps.
        tensor_parallel_size: ranks of a tensor-parallel group; > 1 needs ``LLMEngine(parallel=...)``
            or an initialized default torch.distributed group of this size.
    """

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.5
    page_bytes: int = DEFAULT_PAGE_BYTES
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    attention_backend: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < self.page_bytes:
            raise ValueError(f"kv_cache_bytes ({self.kv_cache_bytes}) is smaller than one page ({self.page_bytes})")


class LLMEngine:
    """Loads one model and runs requests to completion with continuous batching."""

    MODEL_NAME = "model"

    def __init__(self, config: EngineConfig, *, model: torch.nn.Module | None = None, pool: KVPool | None = None,
                 allocator=None, model_name: str | None = None, parallel: TensorParallel | None = None):
        """Load ``config.model`` and make a private pool, or run on injected parts.

        ``model`` (already on ``config.device`` in ``config.dtype``), ``pool`` and ``allocator`` (a
        ``PageAllocator`` or anything with its methods, e.g. ``FlexStoreClient``, on which
        ``model_name`` is registered) let the engine run on weights, a KV pool and page ids
        owned by FlexStore; ``config.model`` then only names the folder of the config files.

        ``parallel`` (with ``config.tensor_parallel_size`` > 1) is this process's rank in the
        tensor-parallel group; without it the initialized default ``torch.distributed`` group is
        used. Every rank runs one engine over the same requests: it loads its shard of the
        weights, keeps its own kv heads' pages in its own pool (same page ids on every rank, as
        the ranks schedule alike) and takes rank 0's sampled tokens.
        """
        if allocator is not None and pool is None:
            raise ValueError("an injected allocator needs the pool whose pages it hands out (pool=...)")
        self.config = config
        self.model_name = model_name or self.MODEL_NAME
        self.dtype = parse_dtype(config.dtype)
        self.device = parse_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # Triton kernels launch on the current device: make it this engine's GPU.
            torch.cuda.set_device(self.device)
        self.folder = resolve_model(config.model)
        self.spec = ModelSpec.from_folder(self.folder)
        self.shard = shard_spec(self.spec, config.tensor_parallel_size)  # refuses a tp that splits kv heads
        self.parallel = parallel = _rank(config.tensor_parallel_size, parallel)
        self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)
        if model is None:
            model = load_model(self.spec, self.dtype, self.device, iter_weights(self.folder, self.dtype), parallel)
        self.model = model
        page_bytes = pool.page_bytes if pool is not None else config.page_bytes
        # Per rank: only this rank's kv heads.
        self.layout = KVLayout(self.shard.num_layers, self.shard.num_kv_heads, self.shard.head_dim,
                               self.dtype, page_bytes)
        if pool is None:
            pages = pool_pages(page_bytes, [self.device], config.kv_cache_bytes, config.gpu_memory_utilization)
            pool = KVPool.allocate(pages * page_bytes, self.device, page_bytes)
        self.pool = pool
        self.allocator = self._allocator(allocator)
        backend = select_backend(config.attention_backend, self.device)
        attention = make_attention(backend, self.pool.view(self.layout), self.shard.num_heads,
                                   self.shard.num_kv_heads, self.shard.head_dim)
        self.backend = backend
        # Under tensor parallelism the decode graphs capture the NCCL all-reduces too (every rank
        # captures the same batch sizes in the same order, as the ranks step alike).
        self.runner = ModelRunner(self.model, self.layout, attention, self.device, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len,
                                  cuda_graphs=not config.enforce_eager, parallel=parallel)
        batched = config.max_num_batched_tokens or max(2048, self.max_model_len)
        self.scheduler = Scheduler(self.allocator, self.model_name, config.max_num_seqs, batched)
        self.eos_token_ids = end_token_ids(self.folder, self.spec)
        self._ids = itertools.count()
        logger.info("loaded %s (%s, %s) on %s; KV pool %d pages of %d B = %d tokens per sequence at most",
                    self.folder, self.spec.architecture, self.dtype, self.device, self.pool.num_pages,
                    page_bytes, self.allocator.max_tokens(self.model_name))

    def _allocator(self, injected):
        """The injected allocator (on which this model must be registered), or a private one."""
        if injected is None:
            allocator = PageAllocator(self.pool.num_pages)
            allocator.register_model(self.model_name, self.layout)
            return allocator
        if self.model_name not in injected.models:
            raise ValueError(f"model {self.model_name!r} is not registered with the injected allocator "
                             f"(it has {sorted(injected.models)})")
        return injected

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        self.check_request(prompt_token_ids, params)
        seq = Sequence(str(next(self._ids)), list(prompt_token_ids), params, self.eos_token_ids, self.max_model_len)
        if params.guided is not None:
            cache = grammar_cache_for(self.folder, self.spec.vocab_size, self.eos_token_ids)
            seq.matcher = cache.matcher(params.guided)  # GrammarError (a ValueError) naming its field
        self.scheduler.add(seq)
        return seq

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run (``sequence.check_request``)."""
        limits = RequestLimits(self.max_model_len, self.spec.vocab_size, self.allocator.max_tokens(self.model_name))
        check_request(prompt_token_ids, params, limits)

    def step(self) -> list[Sequence]:
        """Run one prefill or decode step; return the sequences that finished in it."""
        step = self.scheduler.schedule()
        if step is None:
            return []
        out = self.runner.execute(step.seqs, step.phase)
        for i, seq in enumerate(step.seqs):
            if out.logprobs is not None and out.logprobs[i] is not None:
                seq.logprobs.append(out.logprobs[i])
            if out.prompt_logprobs is not None and out.prompt_logprobs[i] is not None:
                seq.prompt_logprobs = out.prompt_logprobs[i]
        finished = self.scheduler.finish_step(step, out.tokens, out.grammar_done)
        if finished:
            self.runner.release([s.req_id for s in finished])
        return finished

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()


def _rank(tp: int, parallel: TensorParallel | None) -> TensorParallel:
    """This process's rank of a tensor-parallel group of ``tp`` (the default group when not given)."""
    if tp == 1:
        if parallel is not None and parallel.world_size != 1:
            raise ValueError(f"parallel has world size {parallel.world_size} but tensor_parallel_size is 1")
        return TensorParallel()
    if parallel is None:
        parallel = TensorParallel.from_group()
    if parallel.world_size != tp:
        raise ValueError(f"tensor_parallel_size {tp} != the process group's size {parallel.world_size}")
    return parallel
