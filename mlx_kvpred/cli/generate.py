"""kvpred-mlx generate: one completion, streamed (optionally continuing a saved prompt-cache session)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import KVPredError
from .common import (ALLOW_UNTRAINED, DEVICE, EXACT_HEAD, EXACT_KEEP, EXACT_TAIL, KEEP, KVP, KVP_MIN_TOKENS, MAX_TOKENS, MODE, MODEL,
                     SEED, SYSTEM, TEMP, TOP_P, TTFT_BUDGET, app, check_policy_flags, load_for_generation, print_stream,
                     read_prompt, sampler_from_flags)


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt file, or - to read stdin."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Prompt text given inline."),
    model: Optional[str] = MODEL,
    kvp: Optional[str] = KVP,
    mode: str = MODE,
    max_tokens: int = MAX_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the tokenizer's chat template (or feed raw text)."),
    system: Optional[str] = SYSTEM,
    device: Optional[str] = DEVICE,
    allow_untrained: bool = ALLOW_UNTRAINED,
    exact_tail: Optional[int] = EXACT_TAIL,
    exact_head: Optional[int] = EXACT_HEAD,
    exact_keep: Optional[float] = EXACT_KEEP,
    keep: Optional[float] = KEEP,
    kvp_min_tokens: Optional[int] = KVP_MIN_TOKENS,
    ttft_budget: Optional[float] = TTFT_BUDGET,
    prompt_cache: Optional[str] = typer.Option(None, help="A session file (.safetensors): if it exists, the prompt "
                                                          "continues its conversation and only new tokens are "
                                                          "processed; if not, it is created with this turn."),
    update_prompt_cache: bool = typer.Option(False, help="With --prompt-cache: also write this turn back into an "
                                                         "existing file."),
    repair: bool = typer.Option(False, help="With --prompt-cache: recompute predicted K/V with the base before "
                                            "saving, so later runs attend to exact K/V."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the mode chosen and why, prompt tokens, TTFT, "
                                                                 "TPOT, tokens/s, memory."),
):
    """Generate text, streaming it as it is produced."""
    content = read_prompt(prompt, text)
    sampler = sampler_from_flags(temp, top_p, seed, max_tokens)
    tail = check_policy_flags(exact_tail, kvp_min_tokens, ttft_budget)
    if prompt_cache is not None:
        if not chat:
            raise KVPredError("--prompt-cache keeps a chat session: it does not work with --raw")
        if mode in ("aux", "specprefill"):
            raise KVPredError("--prompt-cache runs mode kvp, base or auto")
        from ..session import check_session_path

        check_session_path(Path(prompt_cache))
    elif update_prompt_cache or repair:
        raise KVPredError("--update-prompt-cache and --repair need --prompt-cache FILE")
    pipe = load_for_generation(model, kvp, mode, device, allow_untrained, keep_bundle=prompt_cache is not None,
                               exact_head=exact_head, keep=keep, exact_keep=exact_keep)
    policy = dict(exact_tail=tail, kvp_min_tokens=kvp_min_tokens, ttft_budget=ttft_budget)
    if prompt_cache is None:
        from ..pipeline import encode_prompt, stream_generate

        responses = stream_generate(pipe, encode_prompt(pipe, content, chat=chat, system=system), mode=mode,
                                    max_tokens=max_tokens, sampler=sampler, **policy)
        last = print_stream(responses)
    else:
        last = generate_in_session(pipe, Path(prompt_cache), content, mode=mode, system=system, max_tokens=max_tokens,
                                   sampler=sampler, update=update_prompt_cache, repair=repair, verbose=verbose,
                                   **policy)
    if verbose and last is not None:
        tpot = 1 / last.generation_tps if last.generation_tps else float("nan")
        print("=" * 10, file=sys.stderr)
        print(f"mode: {last.mode} ({last.reason})  device: {pipe.device}  "
              f"bundle: {pipe.bundle.path if pipe.bundle else '-'}", file=sys.stderr)
        print(f"prompt: {last.prompt_tokens} tokens, TTFT {last.ttft * 1e3:.1f} ms "
              f"({last.prompt_tps:.1f} prompt tokens/s)", file=sys.stderr)
        print(f"generation: {last.generation_tokens} tokens, TPOT {tpot * 1e3:.1f} ms "
              f"({last.generation_tps:.1f} tokens/s)", file=sys.stderr)
        print(f"peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)




def generate_in_session(pipe, path: Path, content: str, *, mode: str, system, max_tokens: int, sampler, update: bool,
                        repair: bool, verbose: bool, **policy):
    """generate --prompt-cache: continue (or start) the session in `path`; write it when new or `update`."""
    from ..session import ChatSession

    existed = path.exists()
    if existed:
        session = ChatSession.load(pipe, path, mode=mode, **policy)
        if system is not None and system != session.system:
            raise KVPredError(f"--system differs from the system message saved in {path}")
    else:
        session = ChatSession(pipe, system=system, mode=mode, **policy)
    last = print_stream(session.stream(content, max_tokens=max_tokens, sampler=sampler))
    if verbose:
        t = session.turns[-1]
        print(f"session: {t.cached_tokens} tokens reused from {path}, {t.new_tokens} new "
              f"({t.predicted_tokens} predicted)", file=sys.stderr)
    if existed and not update:
        return last
    if repair and session.pending_repair:
        print(f"repairing {session.pending_repair} tokens...", file=sys.stderr)
        session.repair()
    session.save(path, overwrite=existed)
    print(f"saved the session ({len(session.tokens)} tokens) to {path}", file=sys.stderr)
    return last
