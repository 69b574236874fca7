"""`kvpred-mlx convert` exactness: a small PyTorch reference of KV prediction, written from the method's
description, on tiny random weights saved in the source layouts (CoreNet KVPredictionLLM; plain HF-style aux +
predictor state dicts) -> convert -> load in MLX -> predicted K/V, first-token logits and 16 greedy tokens match.

The reference (not derived from the MLX code): the aux runs prompt[:-1] and keeps its pre-k-norm, pre-RoPE
keys and its values (merged heads); per base layer i one Linear maps aux layer m[i]'s K (and V) to the base's
widths; the base then runs the last prompt token with that cache, applying its own k-norm and RoPE (positions
0..N-2) to the cached keys, as to its own; decoding continues with the base alone.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="converter tests need PyTorch: pip install torch==2.13.0")

from mlx_kvpred.attention import tap_kv  # noqa: E402
from mlx_kvpred.bundle import load_bundle  # noqa: E402
from mlx_kvpred.errors import KVPredError  # noqa: E402
from mlx_kvpred.loading import load_model  # noqa: E402
from mlx_kvpred.pipeline import Pipeline, generate_tokens, predict_cache  # noqa: E402

VOCAB = 101
PROMPT_LEN = 23
N_GEN = 16


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch reference
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RefLayer:
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    n_heads: int
    n_kv: int
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class RefModel:
    embed: torch.Tensor
    layers: list[RefLayer]
    norm: torch.Tensor
    head_dim: int
    rope_theta: float
    rope_traditional: bool
    eps: float
    lm_head: torch.Tensor | None = None  # None: tied to the embedding
    extra: dict = field(default_factory=dict)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, positions, theta, traditional):
    """x (B, H, L, D) rotated by position: pairs (i, i + D/2) (rotate-half) or (2i, 2i + 1) (traditional)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # (L, D/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if traditional:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def heads(x, n):
    B, L, _ = x.shape
    return x.reshape(B, L, n, -1).transpose(1, 2)


def ref_forward(m: RefModel, tokens, past=None):
    """Logits for `tokens` (B, L) after a cache `past` (per layer (K, V): pre-k-norm pre-RoPE keys and values,
    merged heads (B, T, n_kv*hd)); returns (logits, the cache extended with these tokens' K/V)."""
    h = m.embed[tokens]
    B, L, _ = h.shape
    T0 = 0 if past is None else past[0][0].shape[1]
    new_past = []
    for i, layer in enumerate(m.layers):
        x = rms_norm(h, layer.attn_norm, m.eps)
        q = x @ layer.wq.T + (0 if layer.bq is None else layer.bq)
        k = x @ layer.wk.T + (0 if layer.bk is None else layer.bk)
        v = x @ layer.wv.T + (0 if layer.bv is None else layer.bv)
        if past is not None:
            k, v = torch.cat([past[i][0], k], 1), torch.cat([past[i][1], v], 1)
        new_past.append((k, v))
        q, kh, vh = heads(q, layer.n_heads), heads(k, layer.n_kv), heads(v, layer.n_kv)
        if layer.q_norm is not None:
            q, kh = rms_norm(q, layer.q_norm, m.eps), rms_norm(kh, layer.k_norm, m.eps)
        T = kh.shape[2]
        q = rope(q, torch.arange(T0, T0 + L), m.rope_theta, m.rope_traditional)
        kh = rope(kh, torch.arange(T), m.rope_theta, m.rope_traditional)
        rep = layer.n_heads // layer.n_kv
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        scores = q @ kh.transpose(-1, -2) / math.sqrt(m.head_dim)
        mask = torch.arange(T)[None, :] > (torch.arange(T0, T0 + L)[:, None])
        scores = scores.masked_fill(mask, float("-inf"))
        att = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(B, L, -1)
        h = h + att @ layer.wo.T
        x = rms_norm(h, layer.ffn_norm, m.eps)
        h = h + (torch.nn.functional.silu(x @ layer.w_gate.T) * (x @ layer.w_up.T)) @ layer.w_down.T
    h = rms_norm(h, m.norm, m.eps)
    return h @ (m.embed if m.lm_head is None else m.lm_head).T, new_past


@dataclass
class RefPredictor:
    layer_map: list[int]
    key_w: list[torch.Tensor]
    key_b: list[torch.Tensor]
    value_w: list[torch.Tensor]
    value_b: list[torch.Tensor]


@dataclass
class RefRun:
    pred_k: list[torch.Tensor]  # per base layer (N-1, base kv width): predicted pre-norm pre-RoPE keys
    pred_v: list[torch.Tensor]
    cache_k: list[torch.Tensor]  # what the base attends to: k-norm + RoPE applied, (n_kv, N-1, hd)
    first_logits: torch.Tensor
    tokens: list[int]


def ref_kv_prediction(aux: RefModel, base: RefModel, pred: RefPredictor, prompt: list[int],
                      n_gen: int = N_GEN, vocab_limit: int | None = None) -> RefRun:
    """KV prediction: aux prefill of prompt[:-1] -> Linear per base layer -> base runs the last token -> greedy."""
    tokens = torch.tensor([prompt])
    _, aux_cache = ref_forward(aux, tokens[:, :-1])
    pred_k, pred_v, cache = [], [], []
    for i, j in enumerate(pred.layer_map):
        k = aux_cache[j][0] @ pred.key_w[i].T + pred.key_b[i]
        v = aux_cache[j][1] @ pred.value_w[i].T + pred.value_b[i]
        pred_k.append(k[0])
        pred_v.append(v[0])
        cache.append((k, v))
    cache_k = []
    for layer, k in zip(base.layers, pred_k):
        kh = heads(k[None], layer.n_kv)
        if layer.k_norm is not None:
            kh = rms_norm(kh, layer.k_norm, base.eps)
        cache_k.append(rope(kh, torch.arange(k.shape[0]), base.rope_theta, base.rope_traditional)[0])
    logits, cache = ref_forward(base, tokens[:, -1:], cache)
    first = logits[0, -1, :vocab_limit]
    out = [int(first.argmax())]
    while len(out) < n_gen:
        logits, cache = ref_forward(base, torch.tensor([[out[-1]]]), cache)
        out.append(int(logits[0, -1, :vocab_limit].argmax()))
    return RefRun(pred_k, pred_v, cache_k, first, out)


# ----------------------------------------------------------------------------------------------------------------
# Tiny random models and the source layouts
# ----------------------------------------------------------------------------------------------------------------

def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


def _linear(g, out_dim, in_dim):
    return _randn(g, out_dim, in_dim, scale=1.0 / math.sqrt(in_dim))


def _norm_w(g, n):
    return 1.0 + _randn(g, n, scale=0.1)


def make_llama(seed, *, dim=32, n_layers=3, n_heads=4, n_kv=2, inter=48, bias=False, tied=True,
               rope_traditional=False, qk_norm=False, rope_theta=10000.0) -> RefModel:
    g = torch.Generator().manual_seed(seed)
    hd = dim // n_heads
    layers = []
    for _ in range(n_layers):
        layers.append(RefLayer(
            wq=_linear(g, n_heads * hd, dim), wk=_linear(g, n_kv * hd, dim), wv=_linear(g, n_kv * hd, dim),
            wo=_linear(g, dim, n_heads * hd), attn_norm=_norm_w(g, dim), ffn_norm=_norm_w(g, dim),
            w_gate=_linear(g, inter, dim), w_up=_linear(g, inter, dim), w_down=_linear(g, dim, inter),
            n_heads=n_heads, n_kv=n_kv,
            bq=_randn(g, n_heads * hd, scale=0.1) if bias else None,
            bk=_randn(g, n_kv * hd, scale=0.1) if bias else None,
            bv=_randn(g, n_kv * hd, scale=0.1) if bias else None,
            q_norm=_norm_w(g, hd) if qk_norm else None, k_norm=_norm_w(g, hd) if qk_norm else None))
    return RefModel(embed=_randn(g, VOCAB, dim), layers=layers, norm=_norm_w(g, dim), head_dim=hd,
                    rope_theta=rope_theta, rope_traditional=rope_traditional, eps=1e-5,
                    lm_head=None if tied else _randn(g, VOCAB, dim, scale=1 / math.sqrt(dim)),
                    extra=dict(dim=dim, n_heads=n_heads, n_kv=n_kv, inter=inter, bias=bias, tied=tied))


def make_openelm(seed, *, dim=32, head_dim=8, q_heads=(2, 4, 4), kv_heads=(1, 2, 1), inter=(24, 40, 48)) -> RefModel:
    """OpenELM/CoreNet style: per-layer head counts and FFN widths, q/k RMSNorm, rotate-half RoPE, tied head."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for q, kv, f in zip(q_heads, kv_heads, inter):
        layers.append(RefLayer(
            wq=_linear(g, q * head_dim, dim), wk=_linear(g, kv * head_dim, dim), wv=_linear(g, kv * head_dim, dim),
            wo=_linear(g, dim, q * head_dim), attn_norm=_norm_w(g, dim), ffn_norm=_norm_w(g, dim),
            w_gate=_linear(g, f, dim), w_up=_linear(g, f, dim), w_down=_linear(g, dim, f), n_heads=q, n_kv=kv,
            q_norm=_norm_w(g, head_dim), k_norm=_norm_w(g, head_dim)))
    return RefModel(embed=_randn(g, VOCAB, dim), layers=layers, norm=_norm_w(g, dim), head_dim=head_dim,
                    rope_theta=10000.0, rope_traditional=False, eps=1e-6)


def make_predictor(seed, aux: RefModel, base: RefModel, layer_map: list[int]) -> RefPredictor:
    g = torch.Generator().manual_seed(seed)
    a = [l.wk.shape[0] for l in aux.layers]
    b = [l.wk.shape[0] for l in base.layers]
    kw, kb, vw, vb = [], [], [], []
    for i, j in enumerate(layer_map):
        kw.append(_linear(g, b[i], a[j]))
        kb.append(_randn(g, b[i], scale=0.1))
        vw.append(_linear(g, b[i], a[j]))
        vb.append(_randn(g, b[i], scale=0.1))
    return RefPredictor(list(layer_map), kw, kb, vw, vb)


def corenet_state_dict(m: RefModel) -> dict[str, torch.Tensor]:
    """CoreNet OpenELM names: fused qkv rows q|k|v, GLU proj_1 rows gate|up, output layer = embedding."""
    sd = {"token_embeddings.weight": m.embed, "norm.weight": m.norm}
    for i, l in enumerate(m.layers):
        p = f"layers.{i}."
        sd[p + "attn_norm.weight"] = l.attn_norm
        sd[p + "attn.qkv_proj.weight"] = torch.cat([l.wq, l.wk, l.wv])
        sd[p + "attn.q_norm.weight"] = l.q_norm
        sd[p + "attn.k_norm.weight"] = l.k_norm
        sd[p + "attn.out_proj.weight"] = l.wo
        sd[p + "ffn_norm.weight"] = l.ffn_norm
        sd[p + "ffn.proj_1.weight"] = torch.cat([l.w_gate, l.w_up])
        sd[p + "ffn.proj_2.weight"] = l.w_down
    return sd


def openelm_hf_config(m: RefModel) -> dict:
    dim = m.embed.shape[1]
    return {"model_type": "openelm", "model_dim": dim, "head_dim": m.head_dim, "vocab_size": VOCAB,
            "num_transformer_layers": len(m.layers), "num_query_heads": [l.n_heads for l in m.layers],
            "num_kv_heads": [l.n_kv for l in m.layers], "ffn_dim_divisor": 8,
            "ffn_multipliers": [l.w_down.shape[1] / dim for l in m.layers], "ffn_with_glu": True,
            "normalize_qk_projections": True, "share_input_output_layers": True, "rms_norm_eps": 1e-6,
            "rope_freq_constant": 10000, "max_context_length": 512}


def hf_llama_state_dict(m: RefModel) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": m.embed, "model.norm.weight": m.norm}
    for i, l in enumerate(m.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = l.attn_norm
        sd[p + "post_attention_layernorm.weight"] = l.ffn_norm
        for name, w, b in (("q_proj", l.wq, l.bq), ("k_proj", l.wk, l.bk), ("v_proj", l.wv, l.bv),
                           ("o_proj", l.wo, None)):
            sd[p + f"self_attn.{name}.weight"] = w
            if b is not None:
                sd[p + f"self_attn.{name}.bias"] = b
        sd[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(m.head_dim // 2)  # old HF checkpoints carry it
        sd[p + "mlp.gate_proj.weight"] = l.w_gate
        sd[p + "mlp.up_proj.weight"] = l.w_up
        sd[p + "mlp.down_proj.weight"] = l.w_down
    if m.lm_head is not None:
        sd["lm_head.weight"] = m.lm_head
    return sd


def hf_llama_config(m: RefModel, arch: str = "llama") -> dict:
    e = m.extra
    cfg = {"model_type": arch, "hidden_size": e["dim"], "num_hidden_layers": len(m.layers),
           "intermediate_size": e["inter"], "num_attention_heads": e["n_heads"], "num_key_value_heads": e["n_kv"],
           "rms_norm_eps": m.eps, "vocab_size": VOCAB, "rope_theta": m.rope_theta, "max_position_embeddings": 512,
           "tie_word_embeddings": e["tied"]}
    if m.rope_traditional:
        cfg["rope_traditional"] = True
    if arch == "llama" and e["bias"]:
        cfg["attention_bias"] = True
    return cfg


def predictor_state_dict(p: RefPredictor, prefix: str = "predicter.auxkv_to_basekv.") -> dict[str, torch.Tensor]:
    sd = {}
    for i in range(len(p.layer_map)):
        sd[f"{prefix}key_transforms.{i}.weight"] = p.key_w[i]
        sd[f"{prefix}key_transforms.{i}.bias"] = p.key_b[i]
        sd[f"{prefix}value_transforms.{i}.weight"] = p.value_w[i]
        sd[f"{prefix}value_transforms.{i}.bias"] = p.value_b[i]
    return sd


def write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0").save_pretrained(path)
    return path


def write_mlx_lm_dir(path: Path, config: dict, weights: dict[str, torch.Tensor], tok_dir: Path) -> Path:
    """A model dir as mlx-lm reads it (HF names, config.json, tokenizer)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(path)
    return path


def corenet_yaml(path: Path, layer_map: list[int], base_name="OpenELM-tiny-base", aux_name="OpenELM-tiny-aux") -> Path:
    """The part of a CoreNet KV-prediction YAML the converter reads (same nesting as projects/kv-prediction)."""
    path.write_text(f"""\
taskname: '+ [KV Prediction test]'
_anchor_context_length: &_anchor_context_length 512
model:
  freeze_modules: ["base.*"]
  language_modeling:
    name: "kv_prediction"
    kv_prediction:
      auxkv_num_layers_to_basekv_num_layers: {json.dumps(layer_map)}
      base_model:
       - model:
          language_modeling:
            name: "general_gpt"
            general_gpt:
              model_name: "{base_name}"
      auxiliary_model:
       - model:
          language_modeling:
            name: "general_gpt"
            general_gpt:
              model_name: "{aux_name}"
    general_gpt:
      model_name: "{base_name}"
      vocab_size: {VOCAB}
      max_context_length: *_anchor_context_length
""")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------

def prompt_tokens(seed=11) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (PROMPT_LEN,), generator=g).tolist()


def assert_close(mlx_array, ref, what, atol=1e-4):
    got = np.array(mlx_array.astype(mx.float32))
    want = ref.detach().numpy()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.abs(got - want).max())
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol}"


def check_against_reference(base_dir_or_model, bundle_dir: Path, ref: RefRun, prompt: list[int]):
    base = load_model(str(base_dir_or_model), device="cpu") if not hasattr(base_dir_or_model, "model") \
        else base_dir_or_model
    bundle = load_bundle(bundle_dir, base)
    pipe = Pipeline(base, bundle, exact_head=0)  # CoreNet's condition: every prompt position but the last predicted
    p = mx.array(prompt)

    with tap_kv(bundle.aux.layers) as rec:  # the predictor's raw output: pre-norm, pre-RoPE
        bundle.aux(p[None, :-1])
    pk, pv = bundle.predictor([k[0] for k in rec.keys], [v[0] for v in rec.values])
    for i in range(len(ref.pred_k)):
        assert_close(pk[i][0], ref.pred_k[i], f"predicted K, base layer {i}")
        assert_close(pv[i][0], ref.pred_v[i], f"predicted V, base layer {i}")

    cache = predict_cache(pipe, p[:-1])  # what the base attends to: k-norm and RoPE applied to predicted keys
    for i, c in enumerate(cache):
        keys, values = c.state[0][..., :c.offset, :], c.state[1][..., :c.offset, :]
        assert_close(keys[0], ref.cache_k[i], f"cached K, base layer {i}")
        assert_close(values[0], ref.pred_v[i].reshape(ref.pred_v[i].shape[0], keys.shape[1], -1).transpose(0, 1),
                     f"cached V, base layer {i}")
    logits = base.model(p[None, -1:], cache=cache)[0, -1]
    assert_close(logits, ref.first_logits, "first-token logits")

    tokens = [int(t) for t, _ in generate_tokens(pipe, p, mode="kvp", max_tokens=N_GEN)]
    assert tokens == ref.tokens
    return base, bundle


def convert_cli(*args):
    """Run `kvpred-mlx convert` in-process through the real entry point; returns stderr lines."""
    from mlx_kvpred.cli import main

    argv = sys.argv
    sys.argv = ["kvpred-mlx", "convert", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), f"convert exited {e.code}"
    finally:
        sys.argv = argv


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------

AUX_Q, AUX_KV, AUX_FFN = (2, 4, 4), (1, 2, 1), (24, 40, 48)
BASE_Q, BASE_KV, BASE_FFN = (4, 4, 6, 6, 8), (1, 2, 2, 3, 2), (24, 40, 48, 64, 72)
CORENET_MAP = [0, 0, 1, 1, 2]  # KVP-C rule max(i // 2, i - (5 - 3))


@pytest.fixture(scope="module")
def corenet_setup(tmp_path_factory):
    """A CoreNet KVPredictionLLM checkpoint of tiny OpenELMs (per-layer heads, q/k norms), its YAML, a tokenizer."""
    return write_corenet_checkpoint(tmp_path_factory.mktemp("corenet"))


def write_corenet_checkpoint(d: Path) -> dict:
    """kvp.pt (aux, base, predictor in CoreNet names), kvp.yaml and a tokenizer dir under `d`, with the models."""
    aux = make_openelm(1, q_heads=AUX_Q, kv_heads=AUX_KV, inter=AUX_FFN)
    base = make_openelm(2, q_heads=BASE_Q, kv_heads=BASE_KV, inter=BASE_FFN)
    pred = make_predictor(3, aux, base, CORENET_MAP)
    sd = {f"auxiliary.{k}": v for k, v in corenet_state_dict(aux).items()}
    sd.update({f"base.{k}": v for k, v in corenet_state_dict(base).items()})
    sd.update(predictor_state_dict(pred))
    torch.save(sd, d / "kvp.pt")
    return dict(dir=d, sd=sd, ckpt=d / "kvp.pt", yaml=corenet_yaml(d / "kvp.yaml", CORENET_MAP), aux=aux,
                base=base, pred=pred, tok=write_tokenizer(d / "tok"))


def test_corenet_checkpoint_with_base_out(corenet_setup, tmp_path):
    """CoreNet checkpoint -> bundle + the base as an mlx-lm dir; everything matches the PyTorch reference."""
    s = corenet_setup
    out, base_out = tmp_path / "bundle", tmp_path / "base"
    convert_cli(s["ckpt"], "--config", s["yaml"], "--base-out", base_out, "--tokenizer", s["tok"], "--out", out,
                "--dtype", "fp32")
    prompt = prompt_tokens()
    ref = ref_kv_prediction(s["aux"], s["base"], s["pred"], prompt)
    base, bundle = check_against_reference(base_out, out, ref, prompt)
    cfg = bundle.config
    assert cfg.trained and cfg.aux_kind == "separate" and cfg.layer_map == CORENET_MAP
    assert cfg.training["source"] == "converted" and cfg.training["format"] == "corenet"
    assert cfg.training["aux_model_name"] == "OpenELM-tiny-aux" and cfg.training["checkpoint"].endswith("kvp.pt")
    assert base.config["num_kv_heads"] == list(BASE_KV) and cfg.aux_config["num_query_heads"] == list(AUX_Q)
    assert base.config["max_context_length"] == 512  # from the YAML
    assert base.config["rope_freq_constant"] == cfg.aux_config["rope_freq_constant"] == 10000  # CoreNet's default
    # a wrong predictor would not pass: the reference with a perturbed value map differs
    s["pred"].value_b[0] = s["pred"].value_b[0] + 1.0
    try:
        moved = ref_kv_prediction(s["aux"], s["base"], s["pred"], prompt).first_logits - ref.first_logits
        assert moved.abs().max() > 1e-3
    finally:
        s["pred"].value_b[0] = s["pred"].value_b[0] - 1.0


def test_corenet_checkpoint_against_given_base_with_smaller_vocab(corenet_setup, tmp_path):
    """--model: the checkpoint's base is verified against it; CoreNet pads the vocabulary (32128 vs 32000 for
    OpenELM), so an mlx-lm base with fewer embedding rows is the same model. fp16 bundle by default."""
    s = corenet_setup
    small = 97
    cfg = {**openelm_hf_config(s["base"]), "vocab_size": small}
    weights = {f"transformer.{k}": v for k, v in corenet_state_dict(s["base"]).items()}
    weights["transformer.token_embeddings.weight"] = weights["transformer.token_embeddings.weight"][:small]
    base_dir = write_mlx_lm_dir(tmp_path / "hf-base", cfg, weights, s["tok"])
    out = tmp_path / "bundle"
    convert_cli(s["ckpt"], "--config", s["yaml"], "--model", base_dir, "--out", out, "--dtype", "fp32")
    prompt = prompt_tokens(5)
    ref = ref_kv_prediction(s["aux"], s["base"], s["pred"], prompt, vocab_limit=small)
    check_against_reference(base_dir, out, ref, prompt)

    convert_cli(s["ckpt"], "--layer-map", ",".join(map(str, CORENET_MAP)), "--model", base_dir,
                "--out", tmp_path / "fp16")  # default fp16, layer map from the flag
    stored = mx.load(str(tmp_path / "fp16" / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in stored.values())
    base = load_model(str(base_dir), device="cpu")
    tokens = [t for t, _ in generate_tokens(Pipeline(base, load_bundle(tmp_path / "fp16", base)), mx.array(prompt),
                                            mode="kvp", max_tokens=4)]
    assert len(tokens) == 4


@pytest.mark.parametrize("arch, weights_file, prefix, rope_traditional", [
    ("llama", "pytorch_model.bin", "predicter.auxkv_to_basekv.", False),
    ("qwen2", "model.safetensors", "", True),
    ("openelm", "aux.pt", "auxkv_to_basekv.", True),
])
def test_plain_aux_and_predictor_state_dicts(tmp_path, arch, weights_file, prefix, rope_traditional):
    """HF-style aux state dict + config.json, predictor in CoreNet naming; the base is an mlx-lm llama dir
    (rope_traditional as a GGUF-converted llama has it, or rotate-half)."""
    from safetensors.torch import save_file

    tok = write_tokenizer(tmp_path / "tok")
    base = make_llama(21, dim=48, n_layers=4, n_heads=6, n_kv=2, inter=64, rope_traditional=rope_traditional,
                      tied=False)
    base_dir = write_mlx_lm_dir(tmp_path / "base", hf_llama_config(base), hf_llama_state_dict(base), tok)
    aux_dir = tmp_path / "aux"
    aux_dir.mkdir()
    if arch == "openelm":
        aux = make_openelm(22, q_heads=(2, 4), kv_heads=(2, 1), inter=(24, 40))
        aux_cfg = openelm_hf_config(aux)
        aux_sd = {f"transformer.{k}": v for k, v in corenet_state_dict(aux).items()}
    else:
        aux = make_llama(22, dim=32, n_layers=2, n_heads=4, n_kv=1, inter=40, bias=arch == "qwen2")
        aux_cfg = hf_llama_config(aux, arch)
        aux_sd = hf_llama_state_dict(aux)
    (aux_dir / "config.json").write_text(json.dumps(aux_cfg))
    if weights_file.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in aux_sd.items()}, str(aux_dir / weights_file))
    else:
        torch.save(aux_sd, aux_dir / weights_file)
    lmap = [0, 0, 1, 1]
    pred = make_predictor(23, aux, base, lmap)
    torch.save(predictor_state_dict(pred, prefix), tmp_path / "pred.pt")

    out = tmp_path / "bundle"
    source = aux_dir if arch == "qwen2" else aux_dir / weights_file  # a model dir or one file
    convert_cli(source, "--predictor", tmp_path / "pred.pt", "--model", base_dir, "--layer-map", "0,0,1,1",
                "--out", out, "--dtype", "fp32")
    prompt = prompt_tokens(7)
    ref = ref_kv_prediction(aux, base, pred, prompt)
    _, bundle = check_against_reference(base_dir, out, ref, prompt)
    assert bundle.config.aux_config["model_type"] == arch and bundle.config.training["format"] == "pytorch"


def test_bf16_checkpoint_converts(corenet_setup, tmp_path):
    """A bf16 checkpoint (CoreNet trains in bf16) converts; bundle stored in bf16 as asked."""
    s = corenet_setup
    sd = torch.load(s["ckpt"], weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "bf16.pt")
    convert_cli(tmp_path / "bf16.pt", "--config", s["yaml"], "--base-out", tmp_path / "base", "--tokenizer", s["tok"],
                "--out", tmp_path / "b", "--dtype", "bf16")
    stored = mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert all(v.dtype == mx.bfloat16 for v in stored.values())
    base = load_model(str(tmp_path / "base"), device="cpu")
    pipe = Pipeline(base, load_bundle(tmp_path / "b", base), exact_head=0)
    ref = ref_kv_prediction(s["aux"], s["base"], s["pred"], prompt_tokens())
    tokens = [t for t, _ in generate_tokens(pipe, mx.array(prompt_tokens()), mode="kvp", max_tokens=4)]
    assert tokens[0] == ref.tokens[0]  # bf16 weights: the first token survives the rounding on this prompt


def test_generate_cli_runs_converted_bundle(corenet_setup, tmp_path):
    """End to end: convert, then `kvpred-mlx generate --model BASE --kvp BUNDLE` in a fresh process."""
    s = corenet_setup
    out, base_out = tmp_path / "bundle", tmp_path / "base"
    convert_cli(s["ckpt"], "--config", s["yaml"], "--base-out", base_out, "--tokenizer", s["tok"], "--out", out,
                "--dtype", "fp32")
    prompt = prompt_tokens(9)
    text = " ".join(f"w{t}" for t in prompt)
    r = subprocess.run([sys.executable, "-c", "from mlx_kvpred.cli import main; main()", "generate", "--model",
                        str(base_out), "--kvp", str(out), "--text", text, "--raw", "--max-tokens", "8",
                        "--mode", "kvp", "--exact-tail", "1", "--exact-head", "0", "--device", "cpu"],  # CoreNet's
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "You are using a model of type" not in r.stderr  # transformers' openelm warning stays quiet
    got = [int(x) for x in re.findall(r"w(\d+)", r.stdout)]
    want = ref_kv_prediction(s["aux"], s["base"], s["pred"], prompt, n_gen=8).tokens
    want = want[: want.index(0)] if 0 in want else want  # w0 is the EOS token
    assert got and got == want[: len(got)]


def test_rope_base_from_the_yaml(corenet_setup, tmp_path):
    """rope_freq_constant in the CoreNet YAML reaches both converted configs (not a hard-coded 10000)."""
    s = corenet_setup
    yaml_path = tmp_path / "rope.yaml"
    yaml_path.write_text(Path(s["yaml"]).read_text() + "rope_freq_constant: 500000\n")
    convert_cli(s["ckpt"], "--config", yaml_path, "--base-out", tmp_path / "base", "--tokenizer", s["tok"],
                "--out", tmp_path / "bundle", "--dtype", "fp32")
    base_cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    aux_cfg = json.loads((tmp_path / "bundle" / "kvp_config.json").read_text())["aux_config"]
    assert base_cfg["rope_freq_constant"] == aux_cfg["rope_freq_constant"] == 500000


def test_runtime_does_not_import_converters():
    """mlx_kvpred never imports converters (or torch) at module level; cli.py only inside the convert command."""
    import ast

    import mlx_kvpred

    for path in Path(mlx_kvpred.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("converters" in n or n.split(".")[0] == "torch" for n in names), (path.name, names)


def test_corenet_yaml_forms(tmp_path):
    """The nested form of projects/kv-prediction configs, and the flattened dotted form with a string list."""
    from mlx_kvpred.converters.convert import read_corenet_yaml

    cfg = read_corenet_yaml(corenet_yaml(tmp_path / "a.yaml", [0, 0, 1, 1, 2], "OpenELM-1_1B", "OpenELM-270M"))
    assert (cfg.layer_map, cfg.base_name, cfg.aux_name, cfg.max_context_length) == (
        [0, 0, 1, 1, 2], "OpenELM-1_1B", "OpenELM-270M", 512)
    (tmp_path / "b.yaml").write_text(
        "model.language_modeling.kv_prediction.auxkv_num_layers_to_basekv_num_layers: '[0, 0, 1]'\n")
    assert read_corenet_yaml(tmp_path / "b.yaml").layer_map == [0, 0, 1]
    assert cfg.rope_freq_constant == {}  # not set: CoreNet's default, 10000
    (tmp_path / "c.yaml").write_text(
        "model.language_modeling.kv_prediction.auxkv_num_layers_to_basekv_num_layers: [0, 0, 1]\n"
        "model.language_modeling.general_gpt.rope_freq_constant: 500000\n")
    assert read_corenet_yaml(tmp_path / "c.yaml").rope_freq_constant == {"base": 500000.0, "auxiliary": 500000.0}
    (tmp_path / "d.yaml").write_text(
        "model.language_modeling.kv_prediction.auxkv_num_layers_to_basekv_num_layers: [0, 0, 1]\n"
        "model.language_modeling.general_gpt.rope_freq_constant: fast\n")
    with pytest.raises(KVPredError, match="rope_freq_constant must be a positive number"):
        read_corenet_yaml(tmp_path / "d.yaml")
