"""Each LLM's unloaded speed, measured on a started instance: the base latency of the SLO figures."""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

from muxserve.engine.sampling_params import SamplingParams
from muxserve.scheduler.stats import BaseLatency

if TYPE_CHECKING:
    from muxserve.instance.instance import Instance

logger = logging.getLogger(__name__)

PROMPT_LENS = (16, 64, 256)
DECODE_STEPS = 8


def measure_alone(instance: Instance) -> dict[str, BaseLatency]:
    """Measure each LLM alone at batch 1: prefill at a few prompt lengths, then decode steps.

    A first, unmeasured request per LLM warms its runtimes up (kernel selection, allocator).
    """
    bases = {}
    rng = random.Random(0)
    params = SamplingParams(max_tokens=DECODE_STEPS, temperature=0, ignore_eos=True)
    for name in instance.config.model_names:
        limits = instance.limits(name)
        room = min(limits.max_model_len, limits.max_tokens) - DECODE_STEPS
        lengths = [n for n in PROMPT_LENS if n < room]
        points, decode = [], []
        for i, n in enumerate([lengths[0], *lengths]):
            req = instance.submit(name, [rng.randrange(limits.vocab_size) for _ in range(n)], params, time.monotonic())
            instance.run_until_done()
            instance.raise_if_failed([req])
            if i > 0:  # the first one was the warm-up
                points.append((n, req.prefill_end - req.submit))
                decode.append((req.end - req.prefill_end) / (DECODE_STEPS - 1))
        bases[name] = BaseLatency(tuple(points), sum(decode) / len(decode))
        logger.info("%s alone: prefill %s, decode step %.1f ms", name,
                    ", ".join(f"{n} tok {s * 1e3:.1f} ms" for n, s in points), bases[name].decode_step * 1e3)
    return bases
