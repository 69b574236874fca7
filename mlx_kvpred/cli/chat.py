"""kvpred-mlx chat: the interactive REPL (chat_repl.py) over a session."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import KVPredError
from .common import (ALLOW_UNTRAINED, DEVICE, EXACT_HEAD, EXACT_KEEP, EXACT_TAIL, KVP, KVP_MIN_TOKENS, MAX_TOKENS, MODE, MODEL,
                     SEED, SYSTEM, TEMP, TOP_P, TTFT_BUDGET, app, check_policy_flags, load_for_generation,
                     sampler_from_flags)


@app.command()
def chat(
    model: Optional[str] = MODEL,
    kvp: Optional[str] = KVP,
    mode: str = MODE,
    max_tokens: int = MAX_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    system: Optional[str] = SYSTEM,
    device: Optional[str] = DEVICE,
    allow_untrained: bool = ALLOW_UNTRAINED,
    exact_tail: Optional[int] = EXACT_TAIL,
    exact_head: Optional[int] = EXACT_HEAD,
    exact_keep: Optional[float] = EXACT_KEEP,
    kvp_min_tokens: Optional[int] = KVP_MIN_TOKENS,
    ttft_budget: Optional[float] = TTFT_BUDGET,
    load: Optional[str] = typer.Option(None, help="Start from a saved session file (.safetensors)."),
    idle_repair: bool = typer.Option(True, help="Recompute predicted K/V with the base while you type."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="After each answer: mode and why, cached and new "
                                                                 "tokens, TTFT, tokens/s."),
):
    """Chat in the terminal: each turn processes only its new tokens (the rest is cached), long ones by KV
    prediction; predicted K/V are repaired while you type. /help lists the commands."""
    from ..chat_repl import run_repl
    from ..session import ChatSession

    sampler = sampler_from_flags(temp, top_p, seed, max_tokens)
    tail = check_policy_flags(exact_tail, kvp_min_tokens, ttft_budget)
    if mode in ("aux", "specprefill"):
        raise KVPredError("--mode: chat runs kvp, base or auto")
    pipe = load_for_generation(model, kvp, mode, device, allow_untrained, keep_bundle=True, exact_head=exact_head,
                               exact_keep=exact_keep)
    if not getattr(pipe.tokenizer, "chat_template", None):
        raise KVPredError(f"--model {pipe.model_id}: its tokenizer has no chat template (a pretrained model); "
                          "continue text with `kvpred-mlx generate --raw` instead")
    policy = dict(mode=mode, exact_tail=tail, kvp_min_tokens=kvp_min_tokens, ttft_budget=ttft_budget)
    session = (ChatSession.load(pipe, load, **policy) if load else ChatSession(pipe, system=system, **policy))
    run_repl(session, max_tokens=max_tokens, sampler=sampler, verbose=verbose, idle_repair=idle_repair)
