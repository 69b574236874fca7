"""Analytical FLOPs to the first token, attention term included (the paper's 2P estimate leaves it out).

Per token and layer: 2 * (matmul weights of the layer) + 2 * context * d_attn (Kaplan et al.'s attention
term, with d_attn = n_heads * head_dim). The LM head (2 * d_model * vocab) is counted once: only the last
prompt position's logits are computed. `measure_gemm_gflops` measures the rate those FLOPs run at here.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .attention import attention_of, windows
from .bundle import Bundle, scorer_layers
from .loading import LoadedModel


def linear_params(module: nn.Module) -> int:
    """Weights of every (quantized) Linear inside `module`: what a token multiplies by."""
    total = 0
    for _, m in module.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            out_dim, packed = m.weight.shape
            total += out_dim * packed * 32 // m.bits
        elif isinstance(m, nn.Linear):
            total += m.weight.size
        elif "lora_a" in m:  # mlx-lm's LoRALinear: its wrapped Linear is counted above, plus the two factors
            total += m.lora_a.size + m.lora_b.size
    return total


def d_attn(layer: nn.Module) -> int:
    attn = attention_of(layer)
    q_proj = attn.q_proj.linear if "linear" in attn.q_proj else attn.q_proj  # plain or LoRA-wrapped
    head_dim = getattr(attn, "head_dim", None) or q_proj.weight.shape[0] // attn.n_heads
    return attn.n_heads * head_dim


def layers_flops(layers, tokens: int, context: int, windows: Sequence[int | None] | None = None) -> int:
    """FLOPs for `tokens` tokens through `layers`, attending to `context` positions (a span after `offset` cached
    ones: context = offset + tokens), or to their window where `windows` (per layer, attention.windows) has one."""
    windows = windows or [None] * len(layers)
    return sum(tokens * (2 * linear_params(layer) + 2 * min(context, w or context) * d_attn(layer))
               for layer, w in zip(layers, windows))


def lm_head_flops(config: dict) -> int:
    d_model = config.get("hidden_size") or config.get("model_dim")
    return 2 * d_model * config["vocab_size"]


def base_ttft_flops(base: nn.Module, config: dict, n: int) -> int:
    """Plain prefill of n prompt tokens, logits for the last one."""
    return layers_flops(base.layers, n, n, windows(base)) + lm_head_flops(config)


def kvp_ttft_flops(base: nn.Module, config: dict, aux: nn.Module, predictor: nn.Module, n: int,
                   exact_tail: int = 1) -> int:
    """Aux over the n - t predicted tokens (no LM head), predictor over them, base over the last t = exact_tail
    tokens attending to n, counted as base_ttft_flops counts its prefill (t = n: the base's own cost)."""
    t = min(exact_tail, n)
    return (layers_flops(aux.layers, n - t, n - t, windows(aux)) + predictor_flops(predictor, n - t)
            + layers_flops(base.layers, t, n, windows(base)) + lm_head_flops(config))


_span_constants: dict[int, tuple[nn.Module, int, int]] = {}


def span_flops(model: nn.Module, tokens: int, offset: int) -> int:
    """`tokens` new tokens through `model`'s layers after `offset` cached ones (no LM head): layers_flops with the
    model's per-token and per-context constants counted once (mode auto asks before every prompt)."""
    entry = _span_constants.get(id(model))
    if entry is None or entry[0] is not model:
        per_context: dict[int | None, int] = {}  # by window (None: global attention)
        for layer, w in zip(model.layers, windows(model)):
            per_context[w] = per_context.get(w, 0) + 2 * d_attn(layer)
        entry = (model, layers_flops(model.layers, 1, 0), per_context)
        _span_constants[id(model)] = entry
    _, per_token, per_context = entry
    context = offset + tokens
    return tokens * per_token + sum(tokens * min(context, w or context) * f for w, f in per_context.items())


def predictor_flops(predictor: nn.Module, tokens: int) -> int:
    return tokens * 2 * linear_params(predictor)


def specprefill_ttft_flops(base: nn.Module, config: dict, k: int, n: int, exact_tail: int, keep: float) -> int:
    """The base's first k layers over all n tokens, its others over the kept positions and the exact tail (the
    scoring's attention rows, a few tail rows, left out)."""
    t = min(exact_tail, n)
    m = math.ceil(keep * (n - t)) + t
    w = windows(base)
    return (layers_flops(base.layers[:k], n, n, w[:k]) + layers_flops(base.layers[k:], m, m, w[k:])
            + lm_head_flops(config))


def exact_keep_flops(base: nn.Module, bundle: Bundle, predicted: int, exact_keep: float, context: int) -> int:
    """kvp's exact keep: the `exact_keep` fraction of `predicted` positions through the base's layers after the
    aux's, attending to `context` positions."""
    k = len(bundle.aux.layers)
    return layers_flops(base.layers[k:], math.ceil(exact_keep * predicted), context, windows(base)[k:])


def ttft_flops(mode: str, base: LoadedModel, bundle: Bundle | None, n: int, *, exact_tail: int = 1,
               keep: float = 0.0, exact_keep: float = 0.0) -> int:
    """TTFT FLOPs of a mode for an n-token prompt: base (and stock mlx-lm or llama.cpp, the same work), kvp (the base
    computing the last `exact_tail` tokens, and recomputing the `exact_keep` fraction of the others from the first
    layer the aux does not share), specprefill (the `keep` fraction) or the aux alone (with its own LM head: a
    KVP-C aux has its own config)."""
    if mode in ("base", "mlx-lm", "llama.cpp"):
        return base_ttft_flops(base.model, base.config, n)
    if mode == "specprefill":
        return specprefill_ttft_flops(base.model, base.config, scorer_layers(bundle, base.model), n, exact_tail, keep)
    if bundle is None:
        raise ValueError(f"mode {mode} needs a bundle")
    if mode == "kvp":
        predicted = max(n - exact_tail, 0)
        return (kvp_ttft_flops(base.model, base.config, bundle.aux, bundle.predictor, n, exact_tail)
                + exact_keep_flops(base.model, bundle, predicted, exact_keep, predicted))
    if mode == "aux":
        return base_ttft_flops(bundle.aux, bundle.config.aux_config or base.config, n)
    raise ValueError(f"unknown mode {mode!r}")


def measure_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Median fp32 GEMM throughput of MLX on the default device, in GFLOP/s."""
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9
