"""Offline generation with the engine alone: prompts in, answers out.

    python examples/offline_inference.py [--model smollm2-135m] [--device cpu] [--max-tokens 64]
"""

import argparse
import time

from muxserve.engine import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a GPU is.",
    "Name three primary colors.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="short name, Hugging Face folder or .gguf file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per answer at most")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    start = time.perf_counter()
    outputs = llm.chat(conversations, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    elapsed = time.perf_counter() - start
    for question, out in zip(QUESTIONS, outputs):
        print(f"\n>>> {question}\n{out.text.strip()}")
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"\n{len(outputs)} answers, {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tok/s)")


if __name__ == "__main__":
    main()
