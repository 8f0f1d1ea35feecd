"""A small synthetic trace in the LMSYS-Chat format, for smoke tests of the ChatLMSYS pipeline.

    python -m benchmark.chatlmsys.make_synthetic_trace --output /tmp/chatlmsys_synthetic.json

No real LMSYS-Chat trace is available offline. This writes records shaped like the ones the
original's ``chatlmsys.json`` holds and that ``python -m muxserve.muxsched.workload_utils lmsys``
reads: ``{"conversation_id", "model", "conversation": [{"role", "content"}, ...], "turn",
"language", "tstamp"}`` (JSON array, or JSON lines with ``--jsonl``). Model popularity follows a
Zipf law (``--zipf``), arrivals a Poisson process whose rate swings over the day (``--diurnal``),
and prompt/reply lengths are log-normal word counts; a few conversations have one turn only (the
translator's filter drops them). Texts are random words: only their token counts matter. Equal
arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

MODELS = ("vicuna-13b", "koala-13b", "alpaca-13b", "chatglm-6b", "llama-13b", "oasst-pythia-12b", "dolly-v2-12b",
          "fastchat-t5-3b", "stablelm-tuned-alpha-7b", "mpt-7b-chat", "RWKV-4-Raven-14B", "gpt4all-13b-snoozy")
WORDS = ("the model serves many requests on shared GPUs while the scheduler batches prefill and decode jobs "
         "of each language model with a unified cache of pages and quotas that adapt to the load of every "
         "user who asks a question about code math history travel cooking music science").split()
START = 1680307200.0  # 2023-04-01 00:00:00 UTC, about when the LMSYS arena logs begin


def _text(rng: random.Random, mean_words: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(math.log(mean_words), sigma))))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_trace(num_requests: int, days: float, num_models: int, zipf: float, diurnal: float, seed: int,
               prompt_words: float = 40.0, reply_words: float = 90.0, single_turn: float = 0.05) -> list[dict]:
    """``num_requests`` records over ``days`` days, sorted by tstamp."""
    if not 1 <= num_models <= len(MODELS):
        raise ValueError(f"--num-models must be in 1..{len(MODELS)}, got {num_models}")
    if num_requests < 1 or not days > 0:
        raise ValueError(f"need --num-requests >= 1 and --days > 0, got {num_requests} and {days}")
    if not 0 <= diurnal < 1:
        raise ValueError(f"--diurnal must be in [0, 1), got {diurnal}")
    rng = random.Random(seed)
    span = days * 86400.0
    weights = [(i + 1) ** -zipf for i in range(num_models)]
    # Given their number, the times of a Poisson process with rate(t) ∝ 1 + diurnal sin(2 pi t / day)
    # are i.i.d. with that density: draw them by rejection.
    times: list[float] = []
    while len(times) < num_requests:
        t = rng.uniform(0, span)
        if rng.random() * (1 + diurnal) <= 1 + diurnal * math.sin(2 * math.pi * t / 86400.0):
            times.append(t)
    times.sort()
    records = []
    for i, t in enumerate(times):
        model = rng.choices(MODELS[:num_models], weights)[0]
        convo = [{"role": "user", "content": _text(rng, prompt_words, 0.9, 700)}]
        if rng.random() >= single_turn:
            convo.append({"role": "assistant", "content": _text(rng, reply_words, 0.8, 900)})
            if rng.random() < 0.2:
                convo += [{"role": "user", "content": _text(rng, 15, 0.5, 60)},
                          {"role": "assistant", "content": _text(rng, 40, 0.5, 200)}]
        records.append({"conversation_id": f"synthetic-{seed}-{i}", "model": model, "conversation": convo,
                        "turn": (len(convo) + 1) // 2, "language": "English", "tstamp": round(START + t, 3)})
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.chatlmsys.make_synthetic_trace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="trace file to write")
    p.add_argument("--num-requests", type=int, default=2000, help="records (default: 2000)")
    p.add_argument("--days", type=float, default=1.0, help="time span of the trace in days (default: 1)")
    p.add_argument("--num-models", type=int, default=6, help=f"distinct model names, 1-{len(MODELS)} (default: 6)")
    p.add_argument("--zipf", type=float, default=1.2, help="popularity exponent of the models (default: 1.2)")
    p.add_argument("--diurnal", type=float, default=0.5, help="relative swing of the arrival rate over a day (0.5)")
    p.add_argument("--prompt-words", type=float, default=40.0, help="median prompt length in words (default: 40)")
    p.add_argument("--reply-words", type=float, default=90.0, help="median reply length in words (default: 90)")
    p.add_argument("--seed", type=int, default=0, help="equal seeds give byte-identical files (default: 0)")
    p.add_argument("--jsonl", action="store_true", help="JSON lines instead of one JSON array")
    args = p.parse_args(argv)
    try:
        records = make_trace(args.num_requests, args.days, args.num_models, args.zipf, args.diurnal, args.seed,
                             args.prompt_words, args.reply_words)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.jsonl:
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        out.write_text(json.dumps(records) + "\n")
    counts = {}
    for r in records:
        counts[r["model"]] = counts.get(r["model"], 0) + 1
    print(f"wrote {out}: {len(records)} records over {args.days:g} days; "
          + ", ".join(f"{m} {c}" for m, c in sorted(counts.items(), key=lambda kv: -kv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
