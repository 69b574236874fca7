"""The fast CPU ops agree with MLX's own (values and gradients), and a prepared model gives the same logits."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_sdpa

from conftest import tiny_model
from mlx_kvpred.backends.linux_cpu import cpu_kernels, cpu_ops
from mlx_kvpred.backends.linux_cpu.blas import keep_freed_memory
from mlx_kvpred.backends.linux_cpu.cpu_ops import (fast_exp, fast_logsumexp, fast_scaled_dot_product_attention,
                                                   fast_swiglu, prepare_model, restore_model, stock_mlx_ops)


def close(a: mx.array, b: mx.array, tol: float) -> bool:
    return mx.allclose(a, b, rtol=tol, atol=tol).item()


def test_exp_matches_mlx_over_the_float32_range():
    x = mx.concatenate([mx.linspace(-87, 88, 10001), mx.random.normal((5000,)) * 4])
    rel = mx.abs(fast_exp(x) - mx.exp(x)) / mx.exp(x)
    assert rel.max().item() < 1e-6
    assert fast_exp(mx.array([-1e4, 1e4])).tolist() == pytest.approx([mx.exp(mx.array(-87.0)).item(),
                                                                     mx.exp(mx.array(88.0)).item()])
    g = mx.grad(lambda v: fast_exp(v).sum())(x[:100])
    assert close(g, mx.exp(x[:100]), 1e-6)


def test_logsumexp_swiglu_match_with_gradients():
    x = mx.random.normal((3, 7, 301)) * 10
    assert close(fast_logsumexp(x, keepdims=True), mx.logsumexp(x, axis=-1, keepdims=True), 1e-5)
    g1 = mx.grad(lambda v: (fast_logsumexp(v) ** 2).sum())(x)
    g2 = mx.grad(lambda v: (mx.logsumexp(v, axis=-1) ** 2).sum())(x)
    assert close(g1, g2, 1e-4)
    up = mx.random.normal(x.shape)
    assert close(fast_swiglu(x, up), nn.silu(x) * up, 1e-5)
    g1 = mx.grad(lambda v: fast_swiglu(v, up).sum())(x)
    g2 = mx.grad(lambda v: (nn.silu(v) * up).sum())(x)
    assert close(g1, g2, 1e-5)


def test_gelu_approx_matches_with_gradients_and_gemma_mlps_call_it():
    """fast_gelu_approx equals mlx.nn.gelu_approx, gradients too; a prepared gemma3 MLP calls it through its own
    globals' nn (mlx.nn itself untouched, its other names as they are), with the stock MLP's outputs; a llama MLP,
    which reads no nn.gelu_approx, keeps mlx.nn."""
    x = mx.random.normal((3, 7, 301)) * 4
    assert close(cpu_ops.fast_gelu_approx(x), nn.gelu_approx(x), 1e-5)
    g1 = mx.grad(lambda v: (cpu_ops.fast_gelu_approx(v) ** 2).sum())(x)
    g2 = mx.grad(lambda v: (nn.gelu_approx(v) ** 2).sum())(x)
    assert close(g1, g2, 1e-4)
    model = tiny_model("gemma3").model
    mlp = model.layers[0].mlp
    h = mx.random.normal((1, 9, mlp.gate_proj.weight.shape[1]))
    ref = mlp(h)
    prepare_model(model)
    fast_nn = type(mlp).__call__.__globals__["nn"]
    assert fast_nn is not nn and fast_nn.gelu_approx is cpu_ops.fast_gelu_approx and fast_nn.Linear is nn.Linear
    assert nn.gelu_approx is not cpu_ops.fast_gelu_approx
    assert close(mlp(h), ref, 1e-5)
    llama = tiny_model("llama").model
    prepare_model(llama)
    assert type(llama.layers[0].mlp).__call__.__globals__["nn"] is nn


def test_prefill_sized_swiglu_runs_in_c_with_mlx_values_and_gradients(monkeypatch):
    """From _C_SWIGLU_MIN_SIZE elements fast_swiglu runs the C kernel (its values equal the MLX kernel's and
    mlx-lm's silu, gradients too); smaller inputs and C_KERNELS.off() stay in MLX."""
    if not cpu_kernels.available():
        pytest.skip(f"C kernels: {cpu_kernels.note()}")
    calls, original = [], cpu_kernels.swiglu
    monkeypatch.setattr(cpu_kernels, "swiglu", lambda *a: calls.append(a[0].shape) or original(*a))
    x = mx.concatenate([mx.random.normal((2, 40, 1000)) * 10, mx.full((1, 40, 1000), 100.0),
                        mx.full((1, 40, 1000), -100.0)])  # the clamps of exp
    up = mx.random.normal(x.shape)
    out = fast_swiglu(x, up)
    assert calls == [(4, 40, 1000)]
    assert close(out, cpu_ops._swiglu_kernel(x, up), 1e-6) and close(out, nn.silu(x) * up, 1e-5)
    g1 = mx.grad(lambda v: fast_swiglu(v, up).sum())(x)
    assert close(g1, mx.grad(lambda v: (nn.silu(v) * up).sum())(x), 1e-5)
    calls.clear()
    mx.eval(fast_swiglu(x[:1, :10], up[:1, :10]))
    with cpu_kernels.C_KERNELS.off():
        mx.eval(fast_swiglu(x, up))
    assert calls == []


MASKS = {
    "causal": lambda L, S: "causal",
    "none": lambda L, S: None,
    "bool (B,1,L,S)": lambda L, S: mx.random.normal((2, 1, L, S)) > -0.5,
    "bool per head": lambda L, S: mx.random.normal((2, 6, L, S)) > -0.5,
    "additive (L,S)": lambda L, S: mx.random.normal((L, S)),
}


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("L,S", [(96, 96), (80, 112), (1, 1500)])  # (80, 112): a prompt continued after a 32-token
# cache; (1, 1500): a decode step
@pytest.mark.parametrize("block", [None, 6 * 2 * 112 * 7])  # one block; blocks of 7 query rows (a ragged last)
def test_attention_matches_mlx_fast_sdpa(mask, L, S, block, monkeypatch):
    if block:
        monkeypatch.setattr(cpu_ops, "_SDPA_BLOCK_SCORES", block)
        monkeypatch.setattr(cpu_ops, "_SDPA_BLOCK_ROWS", 1 << 20)
    q, k, v = mx.random.normal((2, 6, L, 16)), mx.random.normal((2, 2, S, 16)), mx.random.normal((2, 2, S, 16))
    m = MASKS[mask](L, S)
    out = fast_scaled_dot_product_attention(q, k, v, None, 0.25, m)
    ref = mlx_lm_sdpa(q, k, v, None, scale=0.25, mask=m)
    assert out.shape == ref.shape and close(out, ref, 1e-5)
    g1 = mx.grad(lambda a: fast_scaled_dot_product_attention(a, k, v, None, 0.25, m).sum())(q)
    g2 = mx.grad(lambda a: mlx_lm_sdpa(a, k, v, None, scale=0.25, mask=m).sum())(q)
    assert close(g1, g2, 1e-4)


@pytest.mark.parametrize("path", ["c", "numpy"])
@pytest.mark.parametrize("window", [None, 30])
def test_rows_at_their_own_positions_run_outside_mlx(path, window, monkeypatch):
    """positions.recompute_at's mask (row i sees keys 0..its position, or the last `window` of them): the C kernel
    in one call with each row's span of keys (blocks of 3 rows here, across the gaps), or without a window numpy
    per run of consecutive positions; equal to the MLX attention with that mask, gradients too. A windowed mask
    without the C kernels, and any other bool mask, stay in MLX."""
    c = path == "c" and cpu_kernels.available()
    monkeypatch.setattr(cpu_kernels.C_KERNELS, "enabled", lambda: c)
    monkeypatch.setattr(cpu_ops, "_OUTSIDE_MLX_BLOCK_ROWS", 3)
    S = 120
    positions = mx.array([3, 4, 5, 6, 40, 41, 42, 90, 100, 101, 116], dtype=mx.int32)
    distance = positions[:, None] - mx.arange(S)[None]
    mask = (distance >= 0) & (distance < (window or S))
    starts, ends = cpu_ops._row_spans(mask)
    assert ends.tolist() == (np.array(positions) + 1).tolist()
    assert starts.tolist() == np.maximum(np.array(positions) + 1 - (window or S), 0).tolist()
    assert cpu_ops._causal_runs(ends) == [(0, 4, 7), (4, 7, 43), (7, 8, 91), (8, 10, 102), (10, 11, 117)]
    assert cpu_ops._row_spans(mx.arange(S)[None] <= positions[::-1, None]) is None  # falling: not rows in order
    gapped = mask & (mx.arange(S)[None] != 2)
    assert cpu_ops._row_spans(gapped) is None
    q = mx.random.normal((1, 6, 11, 16))
    k, v = mx.random.normal((1, 2, S, 16)), mx.random.normal((1, 2, S, 16))
    calls = []
    for module, name in ((cpu_ops, "numpy_causal_attention"), (cpu_kernels, "causal_attention"),
                         (cpu_ops, "_blocked_attention")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, f=original, n=name, **kw: calls.append(n) or f(*a, **kw))
    out = fast_scaled_dot_product_attention(q, k, v, None, 0.25, mask)
    assert close(out, mlx_lm_sdpa(q, k, v, None, scale=0.25, mask=mask), 1e-5)
    assert calls == (["causal_attention"] if c else ["numpy_causal_attention"] * 5 if window is None
                     else ["_blocked_attention"])
    g1 = mx.grad(lambda a: fast_scaled_dot_product_attention(a, k, v, None, 0.25, mask).sum())(q)
    g2 = mx.grad(lambda a: mlx_lm_sdpa(a, k, v, None, scale=0.25, mask=mask).sum())(q)
    assert close(g1, g2, 1e-4)


@pytest.mark.parametrize("path", ["c", "numpy"])
@pytest.mark.parametrize("L,S", [(96, 96), (80, 112), (2, 600)])
def test_causal_attention_outside_mlx_equals_the_mlx_blocks(L, S, path, monkeypatch):
    """Causal prefill runs in the C kernel or in numpy (blocks of 7 rows here: a ragged last one); values and the
    gradients of q, k and v equal the MLX blocks' (set_numpy_attention(False)), and mlx_attention() keeps it in MLX."""
    if path == "c" and not cpu_kernels.available():
        pytest.skip(f"C kernels: {cpu_kernels.note()}")
    monkeypatch.setattr(cpu_ops, "_OUTSIDE_MLX_BLOCK_ROWS", 7)
    q, k, v = mx.random.normal((2, 6, L, 16)), mx.random.normal((2, 2, S, 16)), mx.random.normal((2, 2, S, 16))
    loss = lambda q, k, v: (fast_scaled_dot_product_attention(q, k, v, None, 0.25, "causal") ** 2).sum()  # noqa
    calls = []
    for module, name in ((cpu_ops, "numpy_causal_attention"), (cpu_kernels, "causal_attention")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, f=original, n=name, **kw: calls.append(n) or f(*a, **kw))
    results = []
    c_was = cpu_kernels.C_KERNELS.set(path == "c")
    try:
        for outside in (True, False):
            was = cpu_ops.set_numpy_attention(outside)
            try:
                out = fast_scaled_dot_product_attention(q, k, v, None, 0.25, "causal")
                results.append((out, mx.grad(loss, argnums=(0, 1, 2))(q, k, v)))
            finally:
                cpu_ops.set_numpy_attention(was)
    finally:
        cpu_kernels.C_KERNELS.set(c_was)
    assert set(calls) == {"causal_attention" if path == "c" else "numpy_causal_attention"}
    (a, grads_a), (b, grads_b) = results
    assert close(a, b, 1e-5)
    for ga, gb in zip(grads_a, grads_b):
        assert close(ga, gb, 1e-4)
    calls.clear()
    with cpu_ops.mlx_attention():
        mx.eval(fast_scaled_dot_product_attention(q, k, v, None, 0.25, "causal"))
    assert not calls


def test_c_attention_takes_strided_inputs_and_rejects_bad_shapes():
    """The C kernel reads keys as a cache holds them (a slice of a longer buffer) and transposed queries; shapes
    that are not grouped-head attention are a ValueError."""
    if not cpu_kernels.available():
        pytest.skip(f"C kernels: {cpu_kernels.note()}")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 20, 4, 8), dtype=np.float32).transpose(0, 2, 1, 3)  # (2, 4, 20, 8), strided
    buffer = rng.standard_normal((2, 2, 64, 8), dtype=np.float32)
    k, v = buffer[:, :, :30], buffer[:, :, 10:40] * 2
    ref = cpu_ops.numpy_causal_attention(q, k, v, 0.3)
    assert np.abs(cpu_kernels.causal_attention(q, k, v, 0.3, rows=6) - ref).max() < 1e-5
    with pytest.raises(ValueError, match="causal_attention"):
        cpu_kernels.causal_attention(q, k[:, :, :10], v[:, :, :10], 0.3)  # fewer keys than queries


def test_prepared_model_gives_mlx_lm_logits_and_leaves_mlx_lm_alone():
    """prepare_model gives one model's attention, MLP and rope modules subclasses that run the fast ops; mlx-lm's
    module functions and every other model of the architecture (one an app loads itself) stay mlx-lm's own."""
    from mlx_kvpred.backends import get

    model = tiny_model("llama").model
    module = sys.modules[type(model).__module__]
    sdpa, swiglu = module.scaled_dot_product_attention, module.swiglu
    tokens = mx.array([[5, 9, 3, 77, 12, 40, 2, 8] * 12])
    ref = model(tokens)
    attn, mlp, rope = model.layers[0].self_attn, model.layers[0].mlp, model.layers[0].self_attn.rope
    assert type(rope) is nn.RoPE and type(attn) is module.Attention
    prepare_model(model)
    prepare_model(model)  # idempotent
    assert isinstance(rope, nn.RoPE) and type(rope) is not nn.RoPE  # its prefill runs in C
    assert type(attn).__mro__[1] is module.Attention and type(mlp).__mro__[1] is module.MLP
    assert type(attn).__call__.__globals__["scaled_dot_product_attention"] is fast_scaled_dot_product_attention
    assert type(mlp).__call__.__globals__["swiglu"] is fast_swiglu
    assert module.scaled_dot_product_attention is sdpa and module.swiglu is swiglu
    assert type(tiny_model("llama").model.layers[0].self_attn) is module.Attention  # another model: untouched
    assert close(model(tokens), ref, 1e-4)
    with stock_mlx_ops(model):  # bench's mlx-lm mode
        assert type(rope) is nn.RoPE and type(attn) is module.Attention and type(mlp) is module.MLP
    assert type(rope) is not nn.RoPE and type(attn) is not module.Attention
    get("mlx").prepare(model)  # the MLX backend takes the model back to mlx-lm's classes
    assert type(rope) is nn.RoPE and type(attn) is module.Attention and type(mlp) is module.MLP
    assert close(model(tokens), ref, 1e-6)


ROPES = {
    "plain": {},
    "traditional": dict(rope_traditional=True),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_c_rope_equals_the_rope_module(kind, monkeypatch):
    """A rope module after prepare_model runs prefill-sized inputs in C (tables read back from the module itself)
    with the stock module's values, at any offset and on strided q; small inputs, C_KERNELS.off() and array
    offsets stay in MLX. An aux prepared beside the model gets the same rope classes."""
    if not cpu_kernels.available():
        pytest.skip(f"C kernels: {cpu_kernels.note()}")
    model = tiny_model("llama", **ROPES[kind]).model
    stock_type = type(model.layers[0].self_attn.rope)
    calls, original = [], cpu_kernels.rope
    monkeypatch.setattr(cpu_kernels, "rope", lambda *a: calls.append(a[0].shape) or original(*a))
    monkeypatch.setattr(cpu_ops, "_C_ROPE_MIN_SIZE", 1000)
    try:
        prepare_model(model)
        attn = model.layers[0].self_attn
        rope, head_dim = attn.rope, attn.q_proj.weight.shape[0] // attn.n_heads
        assert type(rope).__mro__[1] is stock_type
        x = mx.random.normal((1, 40, 4, head_dim)).transpose(0, 2, 1, 3)  # (1, H, L, D) as attention hands it over
        for offset in (0, 37, 37):  # the second 37 reads its tables back from the cache
            out = rope(x, offset=offset)
            assert close(out, stock_type.__call__(rope, x, offset=offset), 1e-6)
        assert len(calls) == 3
        calls.clear()
        with cpu_kernels.C_KERNELS.off():
            mx.eval(rope(x, offset=3))
        mx.eval(rope(x[:, :1, :2], offset=3), rope(x, offset=mx.array(3)))  # under _C_ROPE_MIN_SIZE; array offset
        assert calls == []
        aux = tiny_model("llama", **ROPES[kind]).model
        prepare_model(aux)
        assert all(type(a.self_attn.rope) is type(rope) for a in aux.layers)
    finally:
        restore_model(model)
    assert type(model.layers[0].self_attn.rope) is stock_type


@pytest.mark.parametrize("kind", ["plain", "traditional", "llama3"])
def test_predicted_kv_appended_in_c_equals_mlx(kind, monkeypatch):
    """write_predicted_kv's C path (cpu_ops.append_kv_in_c: new buffers, keys RoPE'd and values copied in one C
    pass from strided predictor outputs) leaves the caches MLX's path leaves: empty caches, one exact-head position
    already there, and a second append; a cache with room for the new positions that holds more than them, a k-norm
    or C_KERNELS.off() take MLX's path."""
    if not cpu_kernels.available():
        pytest.skip(f"C kernels: {cpu_kernels.note()}")
    from functools import partial

    from mlx_lm.models.cache import KVCache

    from mlx_kvpred.backends import get
    from mlx_kvpred.cache import write_predicted_kv as write_predicted_kv_by

    monkeypatch.setattr(cpu_ops, "_C_ROPE_MIN_SIZE", 1000)
    model = tiny_model("llama", **ROPES[kind]).model
    prepare_model(model)
    calls, original = [], cpu_ops.append_kv_in_c
    monkeypatch.setattr(cpu_ops, "append_kv_in_c", lambda *a: calls.extend(original(*a)) or calls[-len(a[0]):])
    write_predicted_kv = partial(write_predicted_kv_by, backend=get("linux_cpu"))
    try:
        layers = model.layers
        width = layers[0].self_attn.k_proj.weight.shape[0]
        wide = mx.random.normal((1, 300, 5 * width))  # columns of one wide product, as predict_fused gives them
        keys = [wide[..., i * width:(i + 1) * width] for i in range(len(layers))]
        values = [wide[..., (i + 1) * width:(i + 2) * width] for i in range(len(layers))]
        for head in (0, 1):
            ours, theirs = [[KVCache() for _ in layers] for _ in range(2)]
            for caches in (ours, theirs):
                if head:
                    write_predicted_kv(layers, caches, [k[:, :1] for k in keys], [v[:, :1] for v in values])
            with cpu_kernels.C_KERNELS.off():
                write_predicted_kv(layers, theirs, keys, values)
                write_predicted_kv(layers, theirs, [k[:, :40] for k in keys], [v[:, :40] for v in values])
            calls.clear()
            write_predicted_kv(layers, ours, keys, values)
            assert calls == [True] * len(layers)
            write_predicted_kv(layers, ours, [k[:, :40] for k in keys], [v[:, :40] for v in values])
            assert calls[len(layers):] == [False] * len(layers)  # room left in the 512-position buffers
            for a, b in zip(ours, theirs):
                assert a.offset == b.offset == 340 + head
                for x, y in zip(a.state[:2], b.state[:2]):
                    assert close(x[..., :a.offset, :], y[..., :a.offset, :], 1e-6)
        # room in the buffer, but it holds fewer positions than come (kvp's exact head): new buffers too
        ours, theirs = [[KVCache() for _ in layers] for _ in range(2)]
        for caches in (ours, theirs):
            write_predicted_kv(layers, caches, [k[:, :1] for k in keys], [v[:, :1] for v in values])
        with cpu_kernels.C_KERNELS.off():
            write_predicted_kv(layers, theirs, [k[:, 1:101] for k in keys], [v[:, 1:101] for v in values])
        calls.clear()
        write_predicted_kv(layers, ours, [k[:, 1:101] for k in keys], [v[:, 1:101] for v in values])
        assert calls == [True] * len(layers)
        for a, b in zip(ours, theirs):
            assert a.offset == b.offset == 101
            for x, y in zip(a.state[:2], b.state[:2]):
                assert close(x, y, 1e-6)
        qwen3 = tiny_model("qwen3").model
        prepare_model(qwen3)
        assert cpu_ops.append_kv_in_c(qwen3.layers[:1], [KVCache()], keys[:1], values[:1]) == [False]  # k-norm: MLX
        restore_model(qwen3)
    finally:
        restore_model(model)


@pytest.mark.parametrize("kind", ["plain", "traditional", "llama3"])
def test_predicted_kv_in_c_equals_predict_fused_then_write(kind):
    """cpu_ops.predict_kv_in_c (norm, previous-position projection, stacked product and the writes into new cache
    buffers with keys RoPE'd, in one C call) leaves the caches that predict_fused + write_predicted_kv leave: from
    empty caches and after exact-head positions (held as they are, or in a step's buffer), with and without the
    normed stream before, and with room for positions after; predictors that do not stack, too many positions and
    C_KERNELS.off() are declined with nothing done."""
    if not cpu_kernels.available():
        pytest.skip(f"C kernels: {cpu_kernels.note()}")
    from mlx_lm.models.cache import KVCache

    from mlx_kvpred.cache import write_predicted_kv
    from mlx_kvpred.predictor import KVPredictor, PredictorConfig

    model = tiny_model("llama", num_hidden_layers=6, **ROPES[kind]).model
    best = cpu_kernels.decode_isa()
    prepare_model(model)
    try:
        n, width, dim = len(model.layers), model.layers[0].self_attn.k_proj.weight.shape[0], 64
        config = PredictorConfig(aux_kv_dims=(width,), base_kv_dims=(width,) * n, layer_map=(0,) * n, input="hidden",
                                 aux_hidden_dim=dim, exact_layers=(0,), prev_token_dim=4)
        mx.random.seed(1)
        predictor, norm = KVPredictor(config), nn.RMSNorm(dim)
        norm.weight = mx.random.uniform(0.5, 1.5, (dim,))
        learned = predictor.linear_layers
        layers = [model.layers[i] for i in learned]
        names = cpu_kernels.DECODE_ISAS
        cases = [(isa, *case) for isa in names[:names.index(best) + 1]  # each instruction set this CPU has
                 for case in ((37, 0, False, False, 0), (37, 1, True, True, 5), (256, 3, True, True, 300),
                              (9, 2, False, False, 0))]
        for isa, rows, head, held, before, room in cases:
            cpu_kernels.decode_isa(isa)
            stream = mx.random.normal((1, rows, dim)) * 3
            prev = norm(mx.random.normal((1, 1, dim))) if before else None
            old = [(mx.random.normal((1, 2, head, width // 2)), mx.random.normal((1, 2, head, width // 2)))
                   for _ in layers]
            ours, theirs = [[KVCache() for _ in layers] for _ in range(2)]
            for i, (k, v) in enumerate(old if head else ()):
                if held:  # as write_exact_head(hold=True) leaves them
                    ours[i].state = k, v, head
                else:
                    ours[i].update_and_fetch(k, v)
                theirs[i].update_and_fetch(k, v)
            keys, values = predictor.predict_fused([None], [None], norm(stream), prev)
            with cpu_kernels.C_KERNELS.off():
                write_predicted_kv(layers, theirs, [keys[i] for i in learned], [values[i] for i in learned])
            assert cpu_ops.predict_kv_in_c(predictor, norm, stream, prev, layers, ours, room=room)
            for a, b in zip(ours, theirs):
                assert a.offset == b.offset == head + rows and a.keys.shape[2] >= head + rows + room
                for x, y in zip(a.state[:2], b.state[:2]):
                    assert close(x[..., :a.offset, :], y[..., :a.offset, :], 1e-5), (isa, rows, head)
        cpu_kernels.decode_isa(best)
        fresh = [KVCache() for _ in layers]
        stream = mx.random.normal((1, cpu_ops.PREDICT_ROWS_MAX + 1, dim))
        assert not cpu_ops.predict_kv_in_c(predictor, norm, stream, None, layers, fresh)
        with cpu_kernels.C_KERNELS.off():
            assert not cpu_ops.predict_kv_in_c(predictor, norm, stream[:, :8], None, layers, fresh)
        kv_input = KVPredictor(PredictorConfig(aux_kv_dims=(width,), base_kv_dims=(width,) * n, layer_map=(0,) * n))
        assert not cpu_ops.predict_kv_in_c(kv_input, norm, stream[:, :8], None, layers, fresh)
        assert all(c.offset == 0 and c.keys is None for c in fresh)
    finally:
        cpu_kernels.decode_isa(best)
        restore_model(model)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels are not built")
@pytest.mark.parametrize("n_q, n_kv, head_dim, w, S, window", [(9, 3, 64, 32, 300, None), (4, 1, 16, 5, 40, 7),
                                                               (4, 2, 256, 8, 120, 100), (2, 2, 24, 1, 9, None)])
def test_attention_scores_in_c_equal_importances(n_q, n_kv, head_dim, w, S, window):
    """kvp's exact keep and SpecPrefill score positions in one C call (tail_importance) as importance.attention_scores
    does in MLX: grouped heads, keys read in place from a cache's larger buffer, sliding-window layers among global
    ones, a single query, and where the scored span stops before the queries' own positions."""
    from mlx_kvpred.importance import attention_scores

    layers = [nn.Module() for _ in range(3)]
    for i, layer in enumerate(layers):
        layer.self_attn = nn.Module()
        layer.self_attn.scale = head_dim ** -0.5 * (1 + i / 4)
    queries = [mx.random.normal((1, n_q, w, head_dim), key=mx.random.key(i)) * 2 for i in range(3)]
    buffers = [mx.random.normal((1, n_kv, S + 20, head_dim), key=mx.random.key(10 + i)) for i in range(3)]
    keys = [b[:, :, :S] for b in buffers]
    windows = [None, window, None]
    for end in (S - w, S - w - 3):
        want = attention_scores(layers, queries, keys, end=end, windows=windows)
        got = cpu_ops.attention_scores_in_c(layers, queries, keys, end=end, pool=13, windows=windows)
        assert got.shape == (end,) and close(got, want, 1e-6), mx.abs(got - want).max().item()
    with cpu_kernels.C_KERNELS.off():
        assert cpu_ops.attention_scores_in_c(layers, queries, keys, end=S - w, pool=13) is None
    halves = [q.astype(mx.float16) for q in queries]
    assert cpu_ops.attention_scores_in_c(layers, halves, keys, end=S - w, pool=13) is None


def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() is True


def test_quantized_cache_goes_to_mlx_lm_attention():
    """kv_bits: a QuantizedKVCache hands attention (packed, scales, biases) tuples, which only mlx-lm's attention
    reads; the fast attention passes them on instead of failing on their shape."""
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_model("llama", head_dim=32).model  # a head as wide as a quantization group
    prepare_model(model)
    tokens = mx.random.randint(0, 97, (1, 40), key=mx.random.key(2))
    outs = []
    for fast in (True, False):
        (prepare_model if fast else restore_model)(model)
        cache = make_prompt_cache(model)
        with cpu_ops.mlx_attention():  # the same prefill both times: 8-bit K/V would magnify its rounding
            model(tokens, cache=cache)
        cache = [c.to_quantized(group_size=32, bits=8) for c in cache]
        outs.append(model(mx.array([[3]]), cache=cache))
    prepare_model(model)
    assert mx.allclose(outs[0], outs[1], atol=1e-5).item()
