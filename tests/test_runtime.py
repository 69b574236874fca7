"""Runtime exactness on tiny random models: predictor, cache placement of k-norm/RoPE, pipeline modes, bundle."""

import json

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx.utils import tree_flatten

from conftest import attended, tiny_model, write_true_kv
from mlx_kvpred import pipeline
from mlx_kvpred.backends import for_device
from mlx_kvpred.backends.linux_cpu import cpu_kernels
from mlx_kvpred.attention import hidden_dim, kv_dims, lm_head_of
from mlx_kvpred.auxiliary import exact_aux_layers, make_layer_pruned_aux
from mlx_kvpred.bundle import load_bundle, new_bundle, save_bundle, shared_base_layers
from mlx_kvpred.backends.linux_cpu import cpu_ops, decode
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import (Pipeline, generate_tokens, load_pipeline, predict_cache, predict_cache_with_tail,
                                 prompt_then_decode)
from mlx_kvpred.predictor import PredictorConfig, layer_pruned_map, smaller_model_map, spread_layers


def full_copy_pipeline(base, identity=True):
    n = len(base.model.layers)
    aux, _ = make_layer_pruned_aux(base.model, base.config, list(range(n)))
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=list(range(n)), aux_layers=list(range(n)))
    if identity:
        bundle.predictor.set_identity()
    return Pipeline(base, bundle)


def run(pipe, prompt, mode, n=32):
    return list(generate_tokens(pipe, prompt, mode=mode, max_tokens=n))


def test_identity_predictor_reproduces_base_exactly(tiny):
    """aux = all base layers + identity predictor: kvp == base, token for token and logprob for logprob."""
    pipe = full_copy_pipeline(tiny)
    prompt = mx.random.randint(0, tiny.config["vocab_size"], (40,), key=mx.random.key(1))
    base, kvp = run(pipe, prompt, "base"), run(pipe, prompt, "kvp")
    assert [t for t, _ in kvp] == [t for t, _ in base]
    for (_, a), (_, b) in zip(base, kvp):
        assert mx.allclose(a, b, atol=1e-5).item()


def test_exact_layers_reproduce_base_exactly(tiny):
    """aux = all base layers, every layer exact (K/V copied, no weights): kvp == base."""
    n = len(tiny.model.layers)
    aux, _ = make_layer_pruned_aux(tiny.model, tiny.config, list(range(n)))
    bundle = new_bundle(tiny, aux, aux_kind="layer_pruned", layer_map=list(range(n)), aux_layers=list(range(n)),
                        exact_layers=list(range(n)))
    assert not tree_flatten(bundle.predictor.parameters())
    prompt = mx.random.randint(0, tiny.config["vocab_size"], (40,), key=mx.random.key(1))
    pipe = Pipeline(tiny, bundle)
    base, kvp = run(pipe, prompt, "base"), run(pipe, prompt, "kvp")
    assert [t for t, _ in kvp] == [t for t, _ in base]
    for (_, a), (_, b) in zip(base, kvp):
        assert mx.allclose(a, b, atol=1e-5).item()


@pytest.mark.parametrize("prev_token_dim", [0, 8])
def test_hidden_input_bundle(tiny, tmp_path, prev_token_dim):
    """Predictor input "hidden": the aux's final normed hidden state (and with prev_token_dim the previous
    token's, projected) feeds every predicted layer; the bundle round-trips (format 3 / 4), chunked aux
    prefill equals one shot (the previous token crosses chunk borders), and the inputs do matter."""
    n = len(tiny.model.layers)
    aux, _ = make_layer_pruned_aux(tiny.model, tiny.config, [0])
    bundle = new_bundle(tiny, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map([0], n), aux_layers=[0],
                        predictor_input="hidden", exact_layers=[0], prev_token_dim=prev_token_dim)
    bundle.config.trained = True
    assert bundle.predictor.key_transforms[1].weight.shape[1] == hidden_dim(tiny.model) + prev_token_dim == \
        64 + prev_token_dim
    save_bundle(tmp_path / "b", bundle, base=tiny, dtype=mx.float32)
    saved = json.loads((tmp_path / "b" / "kvp_config.json").read_text())
    assert saved["predictor_input"] == "hidden" and saved["exact_layers"] == [0]
    if prev_token_dim:
        assert saved["format_version"] == 4 and saved["prev_token_dim"] == prev_token_dim
    else:  # fields newer than the bundle's format stay out of the JSON, so older readers load it
        assert saved["format_version"] == 3 and "prev_token_dim" not in saved
    loaded = Pipeline(tiny, load_bundle(tmp_path / "b", tiny))
    hidden = mx.random.normal((1, 5, 64))
    aux_k, aux_v = [mx.random.normal((1, 5, kv_dims(aux.layers)[0]))], [mx.random.normal((1, 5, kv_dims(aux.layers)[0]))]
    fused, plain = bundle.predictor.predict_fused(aux_k, aux_v, hidden), bundle.predictor(aux_k, aux_v, hidden)
    for x, y in zip(fused[0] + fused[1], plain[0] + plain[1]):  # one stacked GEMM == one Linear per layer
        assert x.shape == y.shape and mx.allclose(x, y, atol=1e-5).item()
    tokens = mx.random.randint(0, tiny.config["vocab_size"], (37,), key=mx.random.key(3))
    a = predict_cache(Pipeline(tiny, bundle), tokens, prefill_step_size=512)
    b = predict_cache(loaded, tokens, prefill_step_size=8)
    for x, y in zip(a, b):
        assert mx.allclose(attended(x), attended(y), atol=1e-4).item()
        assert mx.allclose(attended(x, 1), attended(y, 1), atol=1e-4).item()
    for lin in loaded.bundle.predictor.value_transforms[1:]:
        lin.weight = lin.weight * 0.5
    c = predict_cache(loaded, tokens)
    assert mx.allclose(c[0].state[1], a[0].state[1], atol=1e-6).item()  # the exact layer is a copy
    assert mx.abs(c[1].state[1] - a[1].state[1]).max().item() > 1e-3
    if prev_token_dim:
        proj = loaded.bundle.predictor.prev_token_proj
        proj.weight = proj.weight * 0.5
        d = predict_cache(loaded, tokens)
        assert mx.abs(d[1].state[0] - c[1].state[0]).max().item() > 1e-3


def test_wrong_predictor_changes_logits(tiny):
    """Guard against a vacuous exactness test: a perturbed predictor must change the first-token logits.
    (Values, not keys: a k-norm, as in qwen3/openelm, undoes a scaling of the keys.)"""
    pipe = full_copy_pipeline(tiny)
    for lin in pipe.bundle.predictor.value_transforms:
        lin.weight = lin.weight * 0.5
    prompt = mx.random.randint(0, tiny.config["vocab_size"], (40,), key=mx.random.key(1))
    (_, a), = run(pipe, prompt, "base", 1)
    (_, b), = run(pipe, prompt, "kvp", 1)
    assert mx.abs(a - b).max().item() > 1e-3


def test_true_prerope_keys_give_true_cache(tiny):
    """RoPE/norm placement: writing the base's own pre-norm pre-RoPE K/V yields the base's post-RoPE cache."""
    model = tiny.model
    tokens = mx.random.randint(0, tiny.config["vocab_size"], (1, 23), key=mx.random.key(2))
    true_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    write_true_kv(model, tokens, true_cache, cache)
    for c, t in zip(cache, true_cache):
        assert c.offset == t.offset == 23
        assert mx.allclose(attended(c), attended(t), atol=1e-5).item()
        assert mx.allclose(attended(c, 1), attended(t, 1), atol=1e-6).item()


def test_chunked_aux_prefill_matches_one_shot(tiny):
    pipe = full_copy_pipeline(tiny)
    tokens = mx.random.randint(0, tiny.config["vocab_size"], (37,), key=mx.random.key(3))
    a = predict_cache(pipe, tokens, prefill_step_size=8)
    b = predict_cache(pipe, tokens, prefill_step_size=512)
    for x, y in zip(a, b):
        assert mx.allclose(attended(x), attended(y), atol=1e-4).item()


def test_base_mode_matches_mlx_lm_generate_step(tiny):
    pipe = Pipeline(tiny, None)
    prompt = mx.random.randint(0, tiny.config["vocab_size"], (30,), key=mx.random.key(4))
    ours = [t for t, _ in run(pipe, prompt, "base", 24)]
    theirs = [t for t, _ in generate_step(prompt, tiny.model, max_tokens=24)]
    assert ours == theirs


@pytest.mark.parametrize("step", [2048, 7])
def test_prompt_then_decode_equals_generate_step(tiny, step):
    """The first token from the last chunk's own pass (no separate pass for the last prompt token): the same
    tokens and log-probabilities as mlx-lm's generate_step, with chunks, a logits processor, one token only."""
    from mlx_lm.sample_utils import make_logits_processors

    assert lm_head_of(tiny.model) is not None  # every tiny architecture has a plain head: the merged path runs
    prompt = mx.random.randint(0, tiny.config["vocab_size"], (30,), key=mx.random.key(5))
    for kwargs, n in (({}, 12), ({"logits_processors": make_logits_processors(repetition_penalty=1.5)}, 12), ({}, 1)):
        ours = list(prompt_then_decode(prompt, tiny.model, backend=for_device("cpu"), max_tokens=n,
                                       prefill_step_size=step, **kwargs))
        theirs = list(generate_step(prompt, tiny.model, max_tokens=n, prefill_step_size=step, **kwargs))
        assert [t for t, _ in ours] == [t for t, _ in theirs] and len(ours) == n
        for (_, a), (_, b) in zip(ours, theirs):
            assert mx.allclose(a, b, atol=1e-4).item()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kvp_with_pruned_aux_runs_and_differs_from_base(arch):
    base = tiny_model(arch, num_hidden_layers=6)
    kept = spread_layers(6, 2)
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    assert len(aux.layers) == 2
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, 6), aux_layers=kept)
    pipe = Pipeline(base, bundle)
    prompt = mx.random.randint(0, 97, (20,), key=mx.random.key(5))
    cache = predict_cache(pipe, prompt[:-1])
    assert len(cache) == 6 and all(c.offset == 19 for c in cache)
    assert len(run(pipe, prompt, "kvp", 8)) == 8
    if arch == "gemma3":  # two blocks, no global one: mlx-lm's gemma3 model cannot run them alone
        with pytest.raises(KVPredError, match="mode aux"):
            run(pipe, prompt, "aux", 8)
    else:
        assert len(run(pipe, prompt, "aux", 8)) == 8


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_exact_tail_is_computed_by_the_base(arch):
    """--exact-tail N: the base runs the last N prompt tokens on the predicted cache of the rest. A tail covering
    the whole prompt is plain base mode, token for token, even with an untrained predictor; a shorter one is
    not; the teacher-forced score agrees with generation."""
    from mlx_kvpred.evaluate import score_sequence

    base = tiny_model(arch, num_hidden_layers=6)
    kept = spread_layers(6, 2)
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    pipe = Pipeline(base, new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, 6),
                                     aux_layers=kept))
    prompt = mx.random.randint(0, 97, (20,), key=mx.random.key(5))
    base_tokens = [t for t, _ in run(pipe, prompt, "base", 8)]
    whole = list(generate_tokens(pipe, prompt, mode="kvp", max_tokens=8, exact_tail=20))
    assert [t for t, _ in whole] == base_tokens
    assert [t for t, _ in generate_tokens(pipe, prompt, mode="kvp", max_tokens=8, exact_tail=5)] != base_tokens
    tokens = mx.concatenate([prompt, mx.array(base_tokens)])
    full = score_sequence(pipe, tokens, 20, with_aux=False, exact_tail=20)
    assert (full["kvp_top1"] == full["base_top1"]).all()
    part = score_sequence(pipe, tokens, 20, with_aux=False, exact_tail=5)
    first = next(generate_tokens(pipe, prompt, mode="kvp", max_tokens=1, exact_tail=5))[0]
    assert part["kvp_top1"][0] == first
    with pytest.raises(KVPredError, match="exact_tail must be >= 1"):
        next(generate_tokens(pipe, prompt, mode="kvp", max_tokens=1, exact_tail=0))


@pytest.mark.parametrize("predictor_input", ["hidden", "kv"])
@pytest.mark.parametrize("step", [2048, 7])  # one chunk; chunks of 7, the 5-token tail across a boundary
def test_exact_tail_through_the_shared_layers_in_the_aux_pass(predictor_input, step, monkeypatch):
    """KVP-LP (aux = base layers 0-1): generate_tokens runs the exact tail's first layers in the aux's pass and the
    base from layer 2 on its residual stream: the same tokens, log-probabilities and cache as the base computing
    the whole tail itself on predict_cache's cache; with the exact head too."""
    base = tiny_model("llama", num_hidden_layers=6)
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 1])
    lmap = layer_pruned_map([0, 1], 6)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=lmap, aux_layers=[0, 1],
                        predictor_input=predictor_input, exact_layers=exact_aux_layers([0, 1], lmap),
                        prev_token_dim=4 if predictor_input == "hidden" else 0)
    assert shared_base_layers(bundle, base.model) == 2
    prompt = mx.random.randint(0, 97, (19,), key=mx.random.key(3))
    calls, in_c = [], []
    monkeypatch.setattr(pipeline, "predict_cache_with_tail",
                        lambda *a, **k: calls.append(1) or predict_cache_with_tail(*a, **k))
    rows_in_c = decode.prefill_rows_in_c

    def recorded(*args, **kwargs):
        out = rows_in_c(*args, **kwargs)
        in_c.append((kwargs.get("stop_layer"), out is not None))
        return out

    monkeypatch.setattr(decode, "prefill_rows_in_c", recorded)
    predicted_in_c, predict_in_c = [], cpu_ops.predict_kv_in_c
    monkeypatch.setattr(cpu_ops, "predict_kv_in_c", lambda *a, **k: predicted_in_c.append(predict_in_c(*a, **k))
                        or predicted_in_c[-1])
    for exact_head in (0, 1):
        pipe = Pipeline(base, bundle, exact_head=exact_head)  # its backend prepares the models (C RoPE on Linux)
        fast = list(generate_tokens(pipe, prompt, mode="kvp", max_tokens=6, exact_tail=5, prefill_step_size=step))
        cache = predict_cache(pipe, prompt[:-5], prefill_step_size=step)
        slow = list(prompt_then_decode(prompt[-5:], base.model, backend=pipe.backend, prompt_cache=cache,
                                       max_tokens=6))
        assert [t for t, _ in fast] == [t for t, _ in slow]
        for (_, a), (_, b) in zip(fast, slow):
            assert mx.allclose(a, b, atol=1e-5).item()
    assert len(calls) == 2  # generate_tokens took the shared-layers path
    # the aux's pass as the base's blocks 0-1 in C where the predictor reads only the hidden state
    in_c_expected = pipe.backend.name == "linux_cpu" and cpu_kernels.available() and predictor_input == "hidden"
    assert ((2, True) in in_c) == in_c_expected
    # ... and the predictor's K/V written in C (predict_kv_in_c) in the same cases
    assert any(predicted_in_c) == in_c_expected
    cache, stream = predict_cache_with_tail(pipe, prompt, 5, prefill_step_size=step)
    assert [c.offset for c in cache] == [19, 19, 14, 14, 14, 14] and stream.shape == (1, 5, 64)


def test_exact_head_is_the_base_own_kv_and_cached():
    """exact_head H: the first H positions of a predicted cache are the base's own K/V (position 0, the attention
    sink, depends on its token alone), computed once per head and reused; later positions stay predicted, and a
    session continuing past the head predicts from its offset on."""
    base = tiny_model("llama", num_hidden_layers=6)
    kept = spread_layers(6, 2)
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, 6), aux_layers=kept)
    prompt = mx.random.randint(0, 97, (20,), key=mx.random.key(5))
    true_cache = make_prompt_cache(base.model)
    base.model(prompt[None], cache=true_cache)
    none, two = Pipeline(base, bundle, exact_head=0), Pipeline(base, bundle, exact_head=2)
    for pipe in (two, two):  # the second call takes the head from pipe.head_kv
        cache = predict_cache(pipe, prompt)
        assert list(pipe.head_kv) == [tuple(prompt[:2].tolist())]
        for c, t in zip(cache, true_cache):
            assert c.offset == 20 and mx.allclose(c.keys[..., :2, :], t.keys[..., :2, :], atol=1e-5).item()
            assert mx.allclose(c.values[..., :2, :], t.values[..., :2, :], atol=1e-5).item()
            assert not mx.allclose(c.keys[..., 2:20, :], t.keys[..., 2:20, :], atol=1e-3).item()
    plain = predict_cache(none, prompt)
    assert not mx.allclose(plain[-1].keys[..., :1, :], true_cache[-1].keys[..., :1, :], atol=1e-3).item()
    for c, p in zip(cache, plain):  # past the head both predict the same
        assert mx.allclose(c.keys[..., 2:20, :], p.keys[..., 2:20, :], atol=1e-5).item()
    longer = predict_cache(Pipeline(base, bundle, exact_head=30), prompt)  # a head longer than the prompt: all base
    assert all(mx.allclose(c.keys[..., :20, :], t.keys[..., :20, :], atol=1e-5).item()
               for c, t in zip(longer, true_cache))
    with pytest.raises(KVPredError, match="exact_head must be >= 0"):
        load_pipeline(exact_head=-1)


def test_layer_maps():
    assert spread_layers(28, 7) == [0, 4, 8, 12, 16, 20, 24]
    assert layer_pruned_map([0, 4, 8, 12, 16, 20, 24], 28) == [i // 4 for i in range(28)]
    assert smaller_model_map(4, 8) == [0, 0, 1, 1, 2, 2, 3, 3]  # max(i // 2, i - 4)
    assert smaller_model_map(3, 8) == [0, 0, 1, 1, 2, 2, 2, 2]  # max(i // 2, i - 5), clipped at 2
    with pytest.raises(KVPredError, match="layer map has 3 entries"):
        PredictorConfig((8, 8), (8, 8, 8, 8), (0, 1, 1))
    with pytest.raises(KVPredError, match="aux layers"):
        PredictorConfig((8, 8), (8, 8), (0, 2))
    with pytest.raises(KVPredError, match="aux layers must be increasing"):
        make_layer_pruned_aux(tiny_model("llama").model, tiny_model("llama").config, [0, 9])


def test_per_layer_kv_dims_openelm():
    base = tiny_model("openelm")
    assert kv_dims(base.model.layers) == [16, 32, 32, 48]


def test_bundle_roundtrip_and_validation(tmp_path):
    base = tiny_model("qwen3")
    kept = [0, 2]
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, 4), aux_layers=kept)
    bundle.aux.layers[1].mlp.down_proj.weight = bundle.aux.layers[1].mlp.down_proj.weight * 1.5  # "fine-tuned"
    bundle.config.trained = True
    save_bundle(tmp_path / "b", bundle, base=base, dtype=mx.float32)
    stored = mx.load(str(tmp_path / "b" / "model.safetensors"))
    aux_keys = [k for k in stored if k.startswith("aux.")]
    assert aux_keys == ["aux.model.layers.1.mlp.down_proj.weight"]  # only what differs from the base
    loaded = load_bundle(tmp_path / "b", base)
    for (k, a), (_, b) in zip(tree_flatten(bundle.predictor.parameters()), tree_flatten(loaded.predictor.parameters())):
        assert mx.array_equal(a, b).item(), k
    assert mx.array_equal(loaded.aux.layers[1].mlp.down_proj.weight, bundle.aux.layers[1].mlp.down_proj.weight).item()

    other = tiny_model("qwen3", seed=7)  # same shapes, other weights
    with pytest.raises(KVPredError, match="different weights"):
        load_bundle(tmp_path / "b", other)
    with pytest.raises(KVPredError, match="6 layers"):
        load_bundle(tmp_path / "b", tiny_model("qwen3", num_hidden_layers=6))

    cfg = json.loads((tmp_path / "b" / "kvp_config.json").read_text())
    cfg["trained"] = False
    (tmp_path / "b" / "kvp_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KVPredError, match="untrained"):
        load_bundle(tmp_path / "b", base)
    assert load_bundle(tmp_path / "b", base, allow_untrained=True) is not None

    data = (tmp_path / "b" / "model.safetensors").read_bytes()
    (tmp_path / "b" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KVPredError, match="model.safetensors"):
        load_bundle(tmp_path / "b", base, allow_untrained=True)


def test_sliding_window_layers_get_rotating_caches():
    """Sliding-window layers use RotatingKVCache; predicted K/V go through the same trimming as the base's."""
    base = tiny_model("llama", layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=16)
    pipe = full_copy_pipeline(base)
    prompt = mx.random.randint(0, 97, (40,), key=mx.random.key(6))
    cache = predict_cache(pipe, prompt[:-1])
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache", "KVCache"] * 2
    kvp = [t for t, _ in generate_tokens(pipe, prompt, mode="kvp", max_tokens=12)]
    assert kvp == [t for t, _ in generate_tokens(pipe, prompt, mode="base", max_tokens=12)]


def test_separate_aux_model_kvp_c(tmp_path):
    """KVP-C: a smaller model of the same family, its own dims; bundle stores its config and all its weights."""
    base = tiny_model("llama", num_hidden_layers=6)
    small = tiny_model("llama", seed=3, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                       num_attention_heads=2, num_key_value_heads=1)
    lmap = smaller_model_map(2, 6)
    bundle = new_bundle(base, small.model, aux_kind="separate", layer_map=lmap, aux_config=small.config)
    assert bundle.predictor.key_transforms[0].weight.shape == (32, 16)  # base 2x16 <- aux 1x16
    bundle.config.trained = True
    save_bundle(tmp_path / "c", bundle, base=base, dtype=mx.float32)
    loaded = load_bundle(tmp_path / "c", base)
    prompt = mx.random.randint(0, 97, (20,), key=mx.random.key(7))
    a = [t for t, _ in generate_tokens(Pipeline(base, bundle), prompt, mode="kvp", max_tokens=8)]
    b = [t for t, _ in generate_tokens(Pipeline(base, loaded), prompt, mode="kvp", max_tokens=8)]
    assert a == b


class _Vocab:
    def __init__(self, vocab):
        self.vocab_size, self._vocab = len(vocab), vocab

    def get_vocab(self):
        return self._vocab


def test_separate_aux_with_other_tokenizer_is_refused():
    from mlx_kvpred.auxiliary import check_same_tokenizer
    from mlx_kvpred.loading import LoadedModel

    a = LoadedModel(None, _Vocab({"a": 0, "b": 1}), {}, "base-dir")
    b = LoadedModel(None, _Vocab({"a": 0, "c": 1}), {}, "aux-dir")
    with pytest.raises(KVPredError, match="aux-dir has a different tokenizer"):
        check_same_tokenizer(a, b)
    check_same_tokenizer(a, LoadedModel(None, _Vocab({"a": 0, "b": 1}), {}, "same"))


def test_load_quantized_mlx_lm_dir_as_fp32_on_cpu(tmp_path):
    """An mlx-lm model dir (here 4-bit quantized) loads through mlx-lm and is dequantized to fp32 on CPU."""
    import mlx.nn as nn
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mlx_kvpred.loading import load_model

    tiny = tiny_model("llama", hidden_size=64, intermediate_size=128)
    reference = tiny.model(mx.array([[1, 2, 3, 4]]))
    nn.quantize(tiny.model, group_size=32, bits=8)
    quantized_out = tiny.model(mx.array([[1, 2, 3, 4]]))
    save_model(tmp_path, tiny.model)
    save_config({**tiny.config, "quantization": {"group_size": 32, "bits": 8}}, tmp_path / "config.json")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    params = dict(tree_flatten(loaded.model.parameters()))
    assert not any(k.endswith(".scales") for k in params)
    assert all(v.dtype == mx.float32 for v in params.values())
    out = loaded.model(mx.array([[1, 2, 3, 4]]))
    assert mx.allclose(out, quantized_out, atol=1e-4).item()
    assert mx.abs(out - reference).max().item() < 0.5  # 8-bit quantization error only


def test_layer_pruned_aux_of_a_mixed_quantized_base():
    """GPU policy keeps quantization: the aux copies each kept layer with its own bits (here 4 and 8)."""
    import mlx.nn as nn

    base = tiny_model("llama", hidden_size=64, intermediate_size=128)
    nn.quantize(base.model, class_predicate=lambda p, m: isinstance(m, (nn.Linear, nn.Embedding)) and
                {"group_size": 32, "bits": 8 if ("embed" in p or "layers.2" in p) else 4})
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 2])
    assert aux.layers[1].mlp.up_proj.bits == 8 and aux.layers[0].mlp.up_proj.bits == 4
    assert mx.array_equal(aux.layers[1].mlp.up_proj.weight, base.model.layers[2].mlp.up_proj.weight).item()
