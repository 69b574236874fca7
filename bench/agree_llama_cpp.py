"""Greedy agreement with llama.cpp on the same GGUF: `python -m mlx_kvpred.bench.agree_llama_cpp --model F.gguf`.

For each prompt: do our tokenizer and llama.cpp's give the same ids, and do the first --tokens greedy tokens of
our base model (mode base, raw text) equal llama-cpp-python's, fed the same ids? Needs llama-cpp-python
(docs/performance.md has the build flags)."""

from __future__ import annotations

import argparse
import json

import mlx.core as mx

from mlx_kvpred.pipeline import generate_tokens, load_pipeline

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "To make a cup of tea, first",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens compared per prompt")
    ap.add_argument("--json", help="write the per-prompt results here")
    args = ap.parse_args(argv)
    from llama_cpp import Llama

    pipe = load_pipeline(args.model, kvp=False, device="cpu")
    llm = Llama(model_path=args.model, n_ctx=512, n_threads=2, verbose=False, logits_all=False)
    rows = []
    for text in PROMPTS:
        ours_ids = pipe.tokenizer.encode(text)
        theirs_ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        ours = [t for t, _ in generate_tokens(pipe, mx.array(ours_ids), mode="base", max_tokens=args.tokens)]
        llm.reset()
        theirs = []
        for token in llm.generate(ours_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == args.tokens:
                break
        rows.append({"prompt": text, "same_prompt_ids": ours_ids == theirs_ids, "ours": ours, "llama_cpp": theirs,
                     "agree": ours == theirs,
                     "first_difference": next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)})
        print(f"{'agree' if ours == theirs else 'DIFFER':6} ids {'same' if ours_ids == theirs_ids else 'DIFFER':6} "
              f"{text[:40]!r} -> {pipe.tokenizer.decode(ours)!r}"
              + ("" if ours == theirs else f" | llama.cpp {pipe.tokenizer.decode(theirs)!r}"))
    print(f"{sum(r['agree'] for r in rows)} of {len(rows)} prompts agree on the first {args.tokens} greedy tokens; "
          f"{sum(r['same_prompt_ids'] for r in rows)} of {len(rows)} tokenize alike")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
