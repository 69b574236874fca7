"""A compiled one-token decode step for llama-style mlx-lm models (llama, qwen2, qwen3).

On the CPU, each MLX primitive costs a few microseconds to schedule, and a decode step of the stock model code is
some 4400 of them for its ~210 matmuls (`mx.fast.rms_norm` and `mx.fast.rope` run as graphs of elementwise ops
there). `CompiledDecoder` runs each block as two compiled functions, the norm / Q K V / RoPE before the cache and
the O projection / norm / MLP after it, with the cache update and attention between them uncompiled (the cache is
updated in place, as mlx-lm's caches are, and attention reads only its filled part). Inside them:
RoPE of every head of q and k at once as `qkv * C + qkv[perm] * S` (two nodes), C and S made once a step by the
model's own rope module (any pairwise-rotation RoPE: plain, llama3, yarn), weights as transposed views made once,
and attention scores as K q^T. A step is ~1600 nodes instead of ~4400 (`mx.export_to_dot`).
Outputs equal the model's own to fp32 rounding.

`CDecoder` goes further where the C kernels are built (cpu_kernels): the whole step is one C call
(decode_step.c) on all cores, reading the same weights and caches in place and writing the step's new keys and
values into cache buffers it made itself (CDecoder.owned). `compiled_decoder` picks it (C_DECODE;
KVPRED_C_DECODE=0 keeps the compiled MLX step).
`CDecoder.run_rows` runs several positions the same way (decode_rows: products of all rows reading each weight
once), which `prefill_rows_in_c` uses for a prompt's last rows, kvp's exact tail and (stopping at a block, the residual
stream out) kvp's aux pass where the aux is the base's first blocks (C_ROWS).
`QuantizedHead` is for a family whose blocks the C step does not run (gemma3): the blocks by the model's own code,
the LM head's row in C on the GGUF's 8-bit values (a 262k vocabulary's head is most of what a token reads).
"""

from __future__ import annotations

import ctypes
import inspect
import weakref
from functools import partial
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from . import cpu_kernels
from ...attention import backbone, lm_head_of, windows
from .cpu_ops import _exp_shifted, _swiglu_kernel, grown_cache_buffers, take_cache_buffers
from ...rope_layout import rope_key, rotation_layout
from ...switch import Switch

ENV_VAR = "KVPRED_COMPILED_DECODE"  # "0": decode with the model's own code
# mlx-lm modules whose blocks are x + attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)), with
# q/k/v/o projections, optional q_norm/k_norm over each head, rope(x, offset=...) before the cache, SwiGLU MLPs.
SUPPORTED_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")

# On for the CPU, where it was measured; read when a generation starts.
COMPILED_DECODE = Switch(ENV_VAR, lambda: mx.default_device() == mx.cpu, "compiled step (llama/qwen2/qwen3 models)",
                         "the model's own step", "the compiled one is for the CPU")
compiled_decode_enabled = COMPILED_DECODE.enabled
set_compiled_decode = COMPILED_DECODE.set  # True, False or None (the default); returns the previous state
# On where the C kernels are built: the whole step in one C call (CDecoder).
C_DECODE = Switch("KVPRED_C_DECODE", cpu_kernels.available, "in C on all cores", "compiled MLX step",
                  lambda: f"C kernels: {cpu_kernels.note()}")


# On where the C decode step is: a prompt's last rows (up to c_rows_max(); kvp's exact tail and aux pass) as one C
# call, products of all rows reading each weight once. Up to how many rows that beat MLX's prefill depends on the
# products' kernel (docs/performance.md): ~256 rows with AVX-512 (a Xeon), ~64 with AVX2 (an AMD EPYC).
C_ROWS_MAX = {"avx512": 256, "avx2": 64}
# Exact keep's recomputed rows (prefill_rows_in_c with positions) go to C where that beat MLX's layer calls: with
# AVX-512, not with AVX2's kernels (1024 tokens, keep 0.1: 890 against 1014 ms, and 1130 against 1037; performance.md).
C_ROWS_AT_ISAS = ("avx512",)
C_ROWS = Switch("KVPRED_C_ROWS", lambda: C_DECODE.enabled() and COMPILED_DECODE.enabled(),
                "a prompt's last rows (up to 256 with AVX-512, 64 with AVX2), kvp's exact tail and aux pass, and "
                "exact keep's recomputed rows (AVX-512), in C",
                "in MLX", "the C decode step is off")


def c_rows_max() -> int:
    """The most rows prefill_rows_in_c takes on this CPU (C_ROWS_MAX by the decode step's instruction set; none with
    the portable loop, which MLX's BLAS beats)."""
    return C_ROWS_MAX.get(cpu_kernels.decode_isa(), 0) if cpu_kernels.available() else 0

# On where decode_step reads quantized weights (AVX2 or AVX-512): the GGUF's own bytes for the weights keep_quantized
# kept.
QUANTIZED_DECODE = Switch("KVPRED_QUANTIZED_DECODE", cpu_kernels.quantized_decode,
                          "reads the GGUF's quantized weights", "reads float32 weights",
                          lambda: "no AVX2 or AVX-512" if cpu_kernels.available() else f"C kernels: {cpu_kernels.note()}")


def keeps_quantized() -> bool:
    """Whether a model loaded now keeps its quantized weights beside the float32 ones (gguf.load_gguf): only where
    the C step would read them (+96 MB for SmolLM2-135M)."""
    return COMPILED_DECODE.enabled() and C_DECODE.enabled() and QUANTIZED_DECODE.enabled()


def compiled_decode_note() -> str:
    """What decodes a token (doctor's "decode" row)."""
    if not COMPILED_DECODE.enabled():
        return COMPILED_DECODE.note()
    if not C_DECODE.enabled():
        return f"{C_DECODE.note()} (llama/qwen2/qwen3 models); other families (gemma3) decode in MLX"
    others = ("; other families (gemma3): blocks in MLX, an 8-bit (Q8_0) LM head in C" if QUANTIZED_DECODE.enabled()
              else "; other families (gemma3) decode in MLX")
    return (f"{C_DECODE.note()} ({cpu_kernels.decode_isa()}), {QUANTIZED_DECODE.note()} (llama/qwen2/qwen3 "
            f"models){others}")


BlockWeights = dict[str, Any]
"""One block's arrays for the compiled step (a dict: what mx.compile takes), weights transposed for `x @ w`:
qkv (q, k, v), o, gate_up (gate, up), down; qkv_bias, o_bias, mlp_bias (gate, up, down), empty for bias-free layers;
norms (input, post-attention, and q/k norms where the block has them)."""


def _sources(block: nn.Module) -> tuple[mx.array, ...]:
    attn, mlp = block.self_attn, block.mlp
    mods = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
            block.input_layernorm, block.post_attention_layernorm]
    mods += [attn.q_norm, attn.k_norm] if "q_norm" in attn else []
    return tuple(a for m in mods for a in ([m.weight] + ([m.bias] if "bias" in m else [])))


def _block_weights(block: nn.Module) -> BlockWeights:
    attn, mlp = block.self_attn, block.mlp
    bias = lambda *ms: tuple(m.bias for m in ms if "bias" in m)  # noqa: E731
    norms = [block.input_layernorm.weight, block.post_attention_layernorm.weight]
    norms += [attn.q_norm.weight, attn.k_norm.weight] if "q_norm" in attn else []
    w = dict(qkv=(attn.q_proj.weight.T, attn.k_proj.weight.T, attn.v_proj.weight.T),
             qkv_bias=bias(attn.q_proj, attn.k_proj, attn.v_proj), o=attn.o_proj.weight.T, o_bias=bias(attn.o_proj),
             gate_up=(mlp.gate_proj.weight.T, mlp.up_proj.weight.T), down=mlp.down_proj.weight.T,
             mlp_bias=bias(mlp.gate_proj, mlp.up_proj, mlp.down_proj), norms=tuple(norms))
    mx.eval(w)  # the transposed views, made once
    return w


def _linear(x: mx.array, weight: mx.array, biases: tuple[mx.array, ...], i: int) -> mx.array:
    return x @ weight + biases[i] if biases else x @ weight


def _attention_inputs(x: mx.array, w: BlockWeights, C: mx.array, S: mx.array, perm: mx.array, *, n_q: int,
                      n_kv: int, eps: float, qk_eps: float | None) -> tuple[mx.array, mx.array, mx.array]:
    """Block input (1, d) -> queries (1, Hkv, group, D) times the attention's scale (in C and S), keys and values
    (1, Hkv, 1, D), q and k RoPE'd."""
    h = mx.fast.rms_norm(x, w["norms"][0], eps)
    qkv = mx.concatenate([_linear(h, wi, w["qkv_bias"], i) for i, wi in enumerate(w["qkv"])], axis=-1)
    if qk_eps is not None:  # qwen3: RMSNorm over each q and k head before RoPE
        heads = qkv.reshape(n_q + 2 * n_kv, -1)
        q = mx.fast.rms_norm(heads[:n_q], w["norms"][2], qk_eps)
        k = mx.fast.rms_norm(heads[n_q:n_q + n_kv], w["norms"][3], qk_eps)
        qkv = mx.concatenate([q, k, heads[n_q + n_kv:]]).reshape(1, -1)
    qkv = (qkv * C + mx.take(qkv, perm, axis=1) * S).reshape(n_q + 2 * n_kv, -1)
    q = qkv[:n_q].reshape(1, n_kv, n_q // n_kv, -1)
    return q, qkv[n_q:n_q + n_kv].reshape(1, n_kv, 1, -1), qkv[n_q + n_kv:].reshape(1, n_kv, 1, -1)


def _attend(queries: mx.array, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """Grouped queries (1, Hkv, group, D) over the cache (1, Hkv, S, D): (P V, the row sums of P (1, Hkv, 1, group)),
    P unnormalized.
    Scores as K q^T: a product with the cache's S rows, which OpenBLAS streams better than one with group rows."""
    scores = keys @ queries.swapaxes(-1, -2)  # (1, Hkv, S, group)
    e = _exp_shifted(scores, scores.max(axis=-2, keepdims=True))
    return e.swapaxes(-1, -2) @ values, e.sum(axis=-2, keepdims=True)


def _block_output(x: mx.array, pv: mx.array, row_sums: mx.array, w: BlockWeights, *, eps: float) -> mx.array:
    """Block input (1, d) and its attention's P V and row sums -> the block's output (1, d)."""
    o = (pv / row_sums.reshape(pv.shape[:-1] + (1,))).reshape(1, -1) @ w["o"]
    h = x + (o + w["o_bias"][0] if w["o_bias"] else o)
    h_norm = mx.fast.rms_norm(h, w["norms"][1], eps)
    gate, up = (_linear(h_norm, wi, w["mlp_bias"], i) for i, wi in enumerate(w["gate_up"]))
    down = _swiglu_kernel(gate, up) @ w["down"]
    return h + (down + w["mlp_bias"][2] if w["mlp_bias"] else down)


class CompiledDecoder:
    """Called like the model (`decoder(tokens, cache=cache)` -> logits) by mlx-lm's generate_step: one token with
    plain K/V caches takes the compiled step, anything else (several tokens, quantized caches) the model itself."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = backbone(model)
        self.head = lm_head_of(model)
        blocks = self.inner.layers
        attn = blocks[0].self_attn
        n_q, n_kv = attn.n_heads, attn.n_kv_heads
        head_dim = attn.q_proj.weight.shape[0] // n_q
        self.rope = attn.rope
        unit, partner, cos_at, sin_at, sign = rotation_layout(self.rope, head_dim)
        self.unit = unit.reshape(1, 1, 1, head_dim)
        heads = n_q + 2 * n_kv
        offsets = mx.arange(heads)[:, None] * head_dim
        self.perm = (partner[None] + offsets).reshape(-1)  # within each head of the whole q|k|v row
        # each head's cos and sin (v heads: 1 and 0), with the attention's scale folded into the q heads'
        scale = mx.array([attn.scale] * n_q + [1.0] * (2 * n_kv))[:, None]
        rotated = mx.array([1.0] * (n_q + n_kv) + [0.0] * n_kv)[:, None]
        self.tables = mx.compile(partial(_rope_tables, rope=self.rope, cos_at=cos_at, sin_at=sin_at,
                                         sign=sign, scale=scale, rotated=rotated))
        eps = blocks[0].input_layernorm.eps
        qk_eps = attn.q_norm.eps if "q_norm" in attn else None
        self.attention_inputs = mx.compile(partial(_attention_inputs, n_q=n_q, n_kv=n_kv, eps=eps, qk_eps=qk_eps))
        self.block_output = mx.compile(partial(_block_output, eps=eps))
        head_modules = [self.inner.norm, self.inner.embed_tokens] + ([model.lm_head] if "lm_head" in model else [])
        # the head's parameters are implicit inputs: read at every call, so weights loaded later are used
        self.logits = mx.compile(lambda h: self.head(self.inner.norm(h)), inputs=head_modules)
        self.weights: list[tuple[tuple[mx.array, ...], BlockWeights] | None] = [None] * len(blocks)

    def __getattr__(self, name: str):  # generate_step and make_prompt_cache read model attributes (layers, ...)
        return getattr(self.model, name)

    def block_weights(self, i: int) -> BlockWeights:
        """Block i's arrays, made again if its modules' arrays changed (a model.update after the first step)."""
        made, sources = self.weights[i], _sources(self.inner.layers[i])
        if made is None or not all(a is b for a, b in zip(made[0], sources)):
            made = self.weights[i] = (sources, _block_weights(self.inner.layers[i]))
        return made[1]

    def __call__(self, inputs: mx.array, cache: Sequence[Any] | None = None, input_embeddings=None, **kwargs):
        if (inputs.shape != (1, 1) or cache is None or input_embeddings is not None or kwargs
                or any(hasattr(c, "bits") for c in cache)):
            return self.model(inputs, cache=cache, input_embeddings=input_embeddings, **kwargs)
        x = self.inner.embed_tokens(inputs[0])
        tables: dict[int, tuple[mx.array, mx.array]] = {}  # cache offset -> C, S
        for i, c in enumerate(cache):
            if c.offset not in tables:
                tables[c.offset] = self.tables(self.unit, mx.array(c.offset))
            w = self.block_weights(i)
            q, k, v = self.attention_inputs(x, w, *tables[c.offset], self.perm)
            keys, values = c.update_and_fetch(k, v)
            x = self.block_output(x, *_attend(q, keys, values), w)  # not compiled: its shapes change every step
        return self.logits(x)[None]


def _address(a: mx.array | None, dtype: type = np.float32) -> int | None:
    """Where an array's data starts (None for None); ValueError unless it is of `dtype` and contiguous."""
    if a is None:
        return None
    view = np.array(a, copy=False)
    if view.dtype != dtype or not view.flags.c_contiguous:
        raise ValueError(f"{view.dtype} array of strides {view.strides}")
    return view.ctypes.data


QuantizedWeight = tuple[mx.array, mx.array, mx.array, int]
"""A weight as MLX's affine quantization stores it (GGUF's Q4_0/Q4_1/Q8_0 as mx.load gives them): packed
values (uint32), scales and biases (float16) per group of 32, bits (4 or 8)."""


def keep_quantized(model: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Keep the quantized form of some of `model`'s float32 weights (parameter name -> QuantizedWeight, the float32
    weight being exactly its dequantization, as gguf.load_gguf makes it): CDecoder's step reads those bytes instead
    (5 or 9 bits a weight instead of 32) while they are the model's weights (not after a model.update)."""
    params = dict(tree_flatten(model.parameters()))
    kept = {id(params[name]): (params[name], *q) for name, q in weights.items()}
    object.__setattr__(model, "_kvpred_quantized", kept)


def _quantized_of(model: nn.Module, w: mx.array) -> QuantizedWeight | None:
    kept = model.__dict__.get("_kvpred_quantized", {}).get(id(w))
    return kept[1:] if kept is not None and kept[0] is w else None


def _point_at_quantized(into: cpu_kernels.Weight, model: nn.Module, w: mx.array) -> bool:
    """Point `into` at w's quantized form where keep_quantized kept one (4 or 8 bits, rows of whole groups of 32)
    and QUANTIZED_DECODE is on; False where not (none kept, or not laid out as GGUF files load)."""
    quantized = _quantized_of(model, w) if QUANTIZED_DECODE.enabled() else None
    if quantized is None or quantized[3] not in (4, 8) or w.shape[1] % 32:
        return False
    packed, scales, biases, bits = quantized
    try:
        into.packed, into.bits = _address(packed, np.uint32), bits
        into.scales, into.biases = _address(scales, np.float16), _address(biases, np.float16)
    except ValueError:
        return False
    into.w = None
    return True


def _drop_replaced_quantized(model: nn.Module) -> None:
    """Forget the quantized forms of weights the model no longer has (and so the old float32 arrays)."""
    kept = model.__dict__.get("_kvpred_quantized")
    if kept:
        live = {id(a): a for _, a in tree_flatten(model.parameters())}
        for key in [key for key, record in kept.items() if live.get(key) is not record[0]]:
            del kept[key]


def _watch(module: nn.Module | list) -> list[tuple[Any, Any, Any]]:
    """(container, key, value) of every module, list and array under `module`: a step checks them all with
    dict/list lookups (`container[key] is value`), which catches a model.update or a swapped module cheaply."""
    items = enumerate(module) if isinstance(module, list) else dict.items(module)
    watched = []
    for key, value in items:
        watched.append((module, key, value))
        if isinstance(value, (nn.Module, list)):
            watched += _watch(value)
    return watched


TABLE_ROWS = 256  # CDecoder makes RoPE tables for blocks of this many positions ...
TABLE_BLOCKS = 8  # ... and keeps this many blocks (2 MB each for SmolLM2-135M)


class CDecoder(CompiledDecoder):
    """The whole decode step as one C call on all cores (cpu_kernels.decode_step), for one token over plain KV
    caches and float32 weights; anything else takes the compiled step. The C step reads the weights and the caches
    in place and writes the new keys and values straight into cache buffers this decoder made (`owned`), which no
    other array can share: made fresh, and written by it alone since (the same arrays, the offset where it left
    them). Other buffers are first copied into owned ones (once: a cache from MLX's prefill, one that was trimmed or
    written by MLX)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        blocks = self.inner.layers
        attn = blocks[0].self_attn
        self.n_kv, self.head_dim = attn.n_kv_heads, self.unit.shape[-1]
        n_qk = (attn.n_heads + self.n_kv) * self.head_dim
        self.partner = np.array(self.perm[:n_qk], dtype=np.int32)
        self.c_layers = (cpu_kernels.StepLayer * len(blocks))()
        self.c_model = cpu_kernels.StepModel(
            n_layers=len(blocks), dim=self.inner.embed_tokens.weight.shape[1], n_q=attn.n_heads, n_kv=self.n_kv,
            head_dim=self.head_dim, hidden=blocks[0].mlp.gate_proj.weight.shape[0],
            eps=blocks[0].input_layernorm.eps, qk_eps=attn.q_norm.eps if "q_norm" in attn else 0.0,
            layers=self.c_layers)
        # cache -> [keys, values (weak references), offset, their KVTargets]: buffers made here and written only by
        # this decoder (not held here, so MLX can still update them in place where another path appends)
        self.owned: weakref.WeakKeyDictionary[KVCache, list] = weakref.WeakKeyDictionary()
        self.logits_out: np.ndarray | None = None
        self.c_watched: list[tuple[Any, Any, Any]] = []  # (container, key, value) of what c_layers/c_model read
        self.c_quantized = False  # whether they point at quantized weights where the model has them
        self.embedding: np.ndarray | None = None
        self.table_blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block b: RoPE tables of b * TABLE_ROWS..

    def _head_weight(self) -> mx.array:
        return _head_module(self.model).weight

    def _set_weight(self, into: cpu_kernels.Weight, w: mx.array) -> None:
        """Point `into` at w, or at its quantized form where keep_quantized kept one and QUANTIZED_DECODE is on."""
        if not _point_at_quantized(into, self.model, w):  # the float32 weight, which is the same numbers
            into.w, into.packed, into.scales, into.biases, into.bits = _address(w), None, None, None, 32

    def _set_weights(self) -> bool:
        """Point the C step at the model's arrays (again if any changed since); False if the C step cannot read
        them (not float32, not contiguous, quantized modules, a biased LM head)."""
        quantized = QUANTIZED_DECODE.enabled()
        if self.c_watched and self.c_quantized == quantized and all(
                container[key] is value for container, key, value in self.c_watched):
            return True
        self.c_watched = []
        _drop_replaced_quantized(self.model)
        inner = self.inner
        if type(inner.embed_tokens) is not nn.Embedding or ("lm_head" in self.model and (
                type(self.model.lm_head) is not nn.Linear or "bias" in self.model.lm_head)):
            return False
        try:
            for layer, b in zip(self.c_layers, inner.layers):
                attn, mlp = b.self_attn, b.mlp
                mods = dict(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj, gate=mlp.gate_proj,
                            up=mlp.up_proj, down=mlp.down_proj)
                for name, m in mods.items():
                    self._set_weight(getattr(layer, name), m.weight)
                    setattr(layer, f"{name}_bias", _address(m.bias) if "bias" in m else None)
                layer.input_norm = _address(b.input_layernorm.weight)
                layer.post_norm = _address(b.post_attention_layernorm.weight)
                layer.q_norm = _address(attn.q_norm.weight) if "q_norm" in attn else None
                layer.k_norm = _address(attn.k_norm.weight) if "k_norm" in attn else None
            self.c_model.final_norm = _address(inner.norm.weight)
            self._set_weight(self.c_model.head, self._head_weight())
            self.embedding = np.array(inner.embed_tokens.weight, copy=False)
            if self.embedding.dtype != np.float32:
                raise ValueError(self.embedding.dtype)
        except ValueError:
            return False
        self.c_model.vocab = self._head_weight().shape[0]
        self.logits_out = np.empty(self.c_model.vocab, np.float32)
        self.c_watched, self.c_quantized = _watch(self.model), quantized
        return True

    def _set_caches(self, cache: Sequence[Any], first_layer: int = 0) -> bool:
        """Point the C step at each cache's keys and values (cache[i] of block first_layer + i); False if one is not
        float32 (1, n_kv, S, head_dim) with each position's head_dim floats contiguous (any strides between heads
        and positions)."""
        for layer, c in zip(self.c_layers[first_layer:], cache):
            if c.keys is None:
                layer.keys = layer.values = None
                continue
            k, v = np.array(c.keys, copy=False), np.array(c.values, copy=False)
            if any(a.dtype != np.float32 or a.shape[:2] != (1, self.n_kv) or a.shape[3] != self.head_dim
                   or a.strides[3] != 4 or a.strides[1] % 4 or a.strides[2] % 4 for a in (k, v)) or k.shape != v.shape:
                return False
            layer.keys, layer.k_head, layer.k_row = k.ctypes.data, k.strides[1] // 4, k.strides[2] // 4
            layer.values, layer.v_head, layer.v_row = v.ctypes.data, v.strides[1] // 4, v.strides[2] // 4
        return True

    def _takes(self, cache: Sequence[Any], first_layer: int = 0, stop_layer: int | None = None, *,
               point: bool = True) -> bool:
        """The C step can run blocks first_layer..stop_layer - 1 (default: to the last) over `cache` (theirs): plain
        KV caches at one offset, weights it can read, and (`point`: pointed at) caches it can read."""
        stop = len(self.c_layers) if stop_layer is None else stop_layer
        return (0 <= first_layer < stop <= len(self.c_layers) and len(cache) == stop - first_layer
                and all(type(c) is KVCache for c in cache) and len({c.offset for c in cache}) == 1
                and self._set_weights() and (not point or self._set_caches(cache, first_layer)))

    def __call__(self, inputs: mx.array, cache: Sequence[Any] | None = None, input_embeddings=None, **kwargs):
        if (inputs.shape != (1, 1) or cache is None or input_embeddings is not None or kwargs
                or not self._takes(cache, point=False)):
            return super().__call__(inputs, cache=cache, input_embeddings=input_embeddings, **kwargs)
        owned = self._owned_targets(cache)
        if owned is None:  # checked (_set_caches) before they are copied into owned buffers
            if not self._set_caches(cache):
                return super().__call__(inputs, cache=cache)
            self._own(cache)
            owned = self._owned_targets(cache)
            if owned is None or not self._set_caches(cache):  # (buffers numpy could not write: not seen)
                return super().__call__(inputs, cache=cache)
        elif not self._points_at(owned[1]):
            self._set_caches(cache)
        kv_out, entries = owned
        past = cache[0].offset
        cos, sin = self._tables(past, 1)
        cpu_kernels.decode_step(self.c_model, self.embedding[inputs.item()], past, cos[0], sin[0], self.partner,
                                kv_out, past, self.logits_out)
        for c, entry in zip(cache, entries):
            c.offset += 1
            entry[2] += 1
        return mx.array(self.logits_out)[None, None]

    def _owned_targets(self, cache: Sequence[Any]) -> tuple[ctypes.Array, list[list]] | None:
        """kv_out at position 0 of each cache's buffers and their `owned` entries, where every cache's buffers are
        owned, at the offset this decoder left, with room for one more position; else None."""
        entries = [self.owned.get(c) for c in cache]
        if not all(self._owns(c, e) for c, e in zip(cache, entries)):
            return None
        return (cpu_kernels.KVTarget * (2 * len(entries)))(*[t for e in entries for t in e[3]]), entries

    @staticmethod
    def _owns(c: KVCache, entry: list | None) -> bool:
        """`c` holds the buffers of its `owned` entry, at the offset this decoder left, with room for a position."""
        return (entry is not None and entry[0]() is c.keys and entry[1]() is c.values and entry[2] == c.offset
                and c.offset < c.keys.shape[2])

    def _points_at(self, entries: Sequence[list]) -> bool:
        """Whether c_layers read the owned buffers of `entries` (so _set_caches can be skipped)."""
        return all(layer.keys == k.out and layer.values == v.out and layer.k_head == k.head_stride
                   and layer.v_head == v.head_stride and layer.k_row == layer.v_row == self.head_dim
                   for layer, (_, _, _, (k, v)) in zip(self.c_layers, entries))

    def _own(self, cache: Sequence[Any]) -> None:
        """Each cache not owned with room for a position in new buffers (positions to the next multiple of its
        step past one more; the cached ones copied in) that become owned; a layer at a time, so that at most one
        layer's old and new buffers are both held."""
        for c in cache:
            if self._owns(c, self.owned.get(c)):
                continue
            grown = grown_cache_buffers([c], [self._plan(c, 1)])
            if grown:
                buffers, views = grown[0]
                take_cache_buffers(c, buffers, 0)
                self._register(c, views)

    def _register(self, c: KVCache, views: Sequence[np.ndarray]) -> None:
        """`c`'s buffers (views: numpy views of them) are owned: made by this decoder, written only by it."""
        self.owned[c] = [weakref.ref(c.keys), weakref.ref(c.values), c.offset, self._targets(views)]

    def _tables(self, start: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """RoPE's C and S tables (rows, (n_q + n_kv) head_dim) at positions start .. start + rows - 1 (any integers),
        from blocks of TABLE_ROWS positions made once."""
        first, last = start // TABLE_ROWS, (start + rows - 1) // TABLE_ROWS
        blocks = [self._table_block(b) for b in range(first, last + 1)]
        at = start - first * TABLE_ROWS
        if len(blocks) == 1:
            return blocks[0][0][at:at + rows], blocks[0][1][at:at + rows]
        return tuple(np.concatenate([b[i] for b in blocks])[at:at + rows] for i in range(2))

    def _tables_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """_tables' C and S at each of `positions` (integers in any order), from the span they cover."""
        first = int(positions.min())
        return tuple(t[positions - first] for t in self._tables(first, int(positions.max()) - first + 1))

    def _table_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The tables of positions b * TABLE_ROWS .. (b + 1) * TABLE_ROWS - 1, made on first use."""
        made = self.table_blocks.get(b)
        if made is None:
            if len(self.table_blocks) >= TABLE_BLOCKS:
                self.table_blocks.pop(next(iter(self.table_blocks)))
            units = mx.broadcast_to(self.unit, self.unit.shape[:2] + (TABLE_ROWS, self.head_dim))
            made = self.table_blocks[b] = tuple(np.array(t[:, :self.partner.size])
                                                for t in self.tables(units, mx.array(b * TABLE_ROWS)))
        return made

    def run_rows(self, cache: Sequence[Any], *, tokens: mx.array | None = None, stream: mx.array | None = None,
                 first_layer: int = 0, stop_layer: int | None = None, positions: mx.array | None = None,
                 rotate_at: mx.array | None = None, queries: list | None = None) -> mx.array | None:
        """Several positions through blocks first_layer..stop_layer - 1 (default: to the last) in one C call
        (decode_rows): `tokens` (1, R), or `stream` (1, R, dim) their residual stream entering block first_layer;
        `cache` those blocks' caches, which get the R new keys and values. Returns the last position's logits
        (1, vocab) when the blocks run to the model's last, else the residual stream leaving block stop_layer - 1
        (1, R, dim); None (nothing done) where the C step cannot run it (see __call__): the caller then runs the
        model. `queries`: each block's rotated queries (1, n_q, R, head_dim) are appended to it. `positions` (R
        sorted positions below the caches' offset): see _run_rows_at. `rotate_at` (R positions): RoPE rotates the
        rows there instead of at their cache positions (SpecPrefill's kept rows, side by side in the cache)."""
        if (tokens is None) == (stream is None) or not self._takes(cache, first_layer, stop_layer):
            return None
        if tokens is not None:
            if tokens.ndim != 2 or tokens.shape[0] != 1 or first_layer:
                return None
            x = self.embedding[np.array(tokens[0])]
        else:
            if stream.ndim != 3 or stream.shape[0] != 1 or stream.dtype != mx.float32:
                return None
            x = np.ascontiguousarray(np.array(stream[0]), np.float32)
        rows, past, n_layers = x.shape[0], cache[0].offset, len(cache)
        model = cpu_kernels.StepModel.from_buffer_copy(self.c_model)
        model.n_layers = n_layers
        model.layers = ctypes.cast(ctypes.byref(self.c_layers, first_layer * ctypes.sizeof(cpu_kernels.StepLayer)),
                                   ctypes.POINTER(cpu_kernels.StepLayer))
        if positions is not None:
            return self._run_rows_at(model, cache, x, positions, first_layer)
        if rotate_at is None:
            cos, sin = self._tables(past, rows)
        else:
            at = np.array(rotate_at, dtype=np.int64)  # below 0 too: SpecPrefill moves its kept rows back
            if at.shape != (rows,):
                return None
            cos, sin = self._tables_at(at)
        grown = self._grown_caches(cache, rows)
        if grown:  # written straight into the caches' new buffers
            kv_out = self._targets([view for _, views in grown for view in views])
        else:  # written to a scratch (keys, values), then appended
            new_kv = np.empty((2, n_layers, self.n_kv, rows, self.head_dim), np.float32)
            kv_out = self._targets([new_kv[kind, i][None] for i in range(n_layers) for kind in (0, 1)])
        to_end = first_layer + n_layers == len(self.c_layers)
        stream_out = None if to_end else np.empty((rows, self.c_model.dim), np.float32)
        n_q, D = self.c_model.n_q, self.head_dim
        queries_out = None if queries is None else np.empty((n_layers, rows, n_q * D), np.float32)
        cpu_kernels.decode_rows(model, x, past, cos, sin, self.partner, kv_out, past if grown else 0,
                                self.logits_out if to_end else None, stream_out, queries_out=queries_out)
        if queries is not None:  # the tables fold the attention's scale into the queries: taken out again
            scale = self.inner.layers[0].self_attn.scale
            q = mx.array(queries_out).reshape(n_layers, rows, n_q, D).transpose(0, 2, 1, 3) / scale
            queries.extend(q[i][None] for i in range(n_layers))
        if grown:
            for c, (buffers, views) in zip(cache, grown):
                take_cache_buffers(c, buffers, rows)
                self._register(c, views)
        else:
            _append(cache, mx.array(new_kv[0])[None], mx.array(new_kv[1])[None])
        out = mx.array(self.logits_out)[None] if to_end else mx.array(stream_out)[None]
        mx.eval(out, [(c.keys, c.values) for c in cache])
        return out

    def _run_rows_at(self, model: cpu_kernels.StepModel, cache: Sequence[Any], x: np.ndarray, positions: mx.array,
                     first_layer: int) -> mx.array | None:
        """kvp's exact keep in C: rows `x` (R, dim) at `positions` (sorted, below the caches' offset, which hold every
        position) through `model`'s blocks; each row's K/V replace the cached ones at its position, and it attends
        to every position up to its own. The caches first get fresh copies of their buffers, which the C step
        writes in place. Up to c_rows_max() rows a call: the rows of a later call are at later positions and
        attend to the earlier ones' K/V, written already. Returns the streams leaving the last block (1, R, dim);
        None (nothing done) for fewer than 2 rows or positions not sorted below the offset."""
        at = np.ascontiguousarray(np.array(positions), np.int32)
        end, rows = cache[0].offset, x.shape[0]
        if at.shape != (rows,) or rows < 2 or at[0] < 0 or at[-1] >= end or np.any(np.diff(at) <= 0):
            return None
        grown = grown_cache_buffers(cache, [(self.n_kv, self.head_dim, c.keys.shape[2], None) for c in cache])
        if len(grown) != len(cache):
            return None
        for i, c in enumerate(cache):
            take_cache_buffers(c, grown[i][0], 0)
            self._register(c, grown[i][1])
        if not self._set_caches(cache, first_layer):
            return None
        kv_out = self._targets([view for i in range(len(cache)) for view in grown[i][1]])
        cos, sin = self._tables_at(at)
        stream_out = np.empty((rows, self.c_model.dim), np.float32)
        calls = -(-rows // max(c_rows_max(), 4))  # of equal rows: at least 2 each
        bounds = [rows * i // calls for i in range(calls + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            cpu_kernels.decode_rows(model, x[lo:hi], end, cos[lo:hi], sin[lo:hi], self.partner, kv_out, 0, None,
                                    stream_out[lo:hi], positions=at[lo:hi])
        out = mx.array(stream_out)[None]
        mx.eval(out)
        return out

    def _grown_caches(self, cache: Sequence[Any], rows: int) -> list[tuple[list[mx.array], list[np.ndarray]]] | None:
        """Where every cache must grow for `rows` more positions: new buffers (the cached positions copied in) and
        writable views of them, one pair per cache; else None (some cache has room: the rows are appended to it)."""
        if any(c.keys is not None and c.offset + rows <= c.keys.shape[2] for c in cache):
            return None
        grown = grown_cache_buffers(cache, [self._plan(c, rows) for c in cache])
        return [grown[i] for i in range(len(cache))] if len(grown) == len(cache) else None

    def _plan(self, c: KVCache, rows: int) -> tuple:
        """grown_cache_buffers' plan for `c` to take `rows` more positions: mlx-lm's capacities (multiples of its
        step)."""
        return self.n_kv, self.head_dim, -(-(c.offset + rows) // c.step) * c.step, None

    @staticmethod
    def _targets(buffers: Sequence[np.ndarray]) -> ctypes.Array:
        """decode_rows' kv_out: each (1, n_kv, positions, head_dim) buffer from its position 0."""
        targets = (cpu_kernels.KVTarget * len(buffers))()
        for t, b in zip(targets, buffers):
            t.out, t.head_stride = b.ctypes.data, b.strides[1] // 4
        return targets


def prefill_rows_in_c(model: nn.Module, cache: Sequence[Any], *, tokens: mx.array | None = None,
                      stream: mx.array | None = None, first_layer: int = 0, stop_layer: int | None = None,
                      positions: mx.array | None = None, rotate_at: mx.array | None = None,
                      queries: list | None = None) -> mx.array | None:
    """A prompt's last rows (at most c_rows_max(): `tokens` (1, R) or the residual `stream` (1, R, dim) entering block
    first_layer) through blocks first_layer..stop_layer - 1 (default: to the last) as one C call where C_ROWS is on
    and the model has a C decoder (CDecoder.run_rows): the last row's logits (1, vocab), or with an earlier
    `stop_layer` the residual stream leaving its block (1, R, dim); the caches extended, each block's queries
    appended to `queries` if given, the rows rotated at `rotate_at` if given. With `positions` (on the instruction
    sets of C_ROWS_AT_ISAS), any number of rows at those positions of caches holding every position, replacing their
    K/V there (CDecoder._run_rows_at). Else None and nothing done."""
    rows = (tokens if tokens is not None else stream).shape[1]
    if not C_ROWS.enabled() or not c_rows_max():
        return None
    if positions is None and rows > c_rows_max():  # rows at positions go as several calls (_run_rows_at)
        return None
    if positions is not None and cpu_kernels.decode_isa() not in C_ROWS_AT_ISAS:
        return None
    decoder = compiled_decoder(model)
    if not isinstance(decoder, CDecoder) or any(windows(model)):  # the C step attends to every cached position
        return None
    return decoder.run_rows(cache, tokens=tokens, stream=stream, first_layer=first_layer, stop_layer=stop_layer,
                            positions=positions, rotate_at=rotate_at, queries=queries)


def _append(cache: Sequence[Any], new_k: mx.array, new_v: mx.array) -> None:
    """Append new keys and values (1, n_layers, n_kv, R, head_dim) to each layer's KVCache: in place where the
    buffer has room (KVCache.update_and_fetch's write), else grown as mlx-lm grows it, one layer evaluated at a
    time (all layers' old, zeroed and grown buffers in one graph would be alive at once: ~4x the cache's bytes)."""
    rows = new_k.shape[3]
    for i, c in enumerate(cache):
        past = c.offset
        if c.keys is not None and past + rows <= c.keys.shape[2]:
            c.keys[:, :, past:past + rows] = new_k[:, i]
            c.values[:, :, past:past + rows] = new_v[:, i]
            c.offset += rows
        else:
            c.update_and_fetch(new_k[:, i], new_v[:, i])
            mx.eval(c.keys, c.values)


def _rope_tables(unit: mx.array, offset: mx.array, *, rope: nn.Module, cos_at: mx.array, sin_at: mx.array,
                 sign: mx.array, scale: mx.array, rotated: mx.array) -> tuple[mx.array, mx.array]:
    """C and S (L, (n_q + 2 n_kv) D) at positions offset .. offset + L - 1 for `unit` (1, 1, L, D): rope(u) holds
    each pair's cos and sin (any rope module that rotates pairs: plain, llama3, yarn); C is 1 and S 0 over v and
    past the rotated dims."""
    rows = unit.shape[-2]
    r = rope(unit, offset=offset).reshape(rows, 1, -1)
    cos, sin = r[..., cos_at], r[..., sin_at] * sign
    C = mx.where(rotated > 0, cos, 1.0) * scale
    return C.reshape(rows, -1), (sin * rotated * scale).reshape(rows, -1)


class QuantizedHead:
    """Called like the model by mlx-lm's generate_step, for a family whose blocks the C step does not run (gemma3):
    one token's blocks by the model's own code, then its LM head's row in C on the GGUF's quantized values
    (keep_quantized; gemma3's Q8_0 head read at 9 bits a value instead of 32: 262k x 640 is 671 MB of float32).
    Anything else (several tokens, a head without a kept form, e.g. after a model.update) runs the model itself."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = backbone(model)
        self.weight = cpu_kernels.Weight()
        self.pointed_at: mx.array | None = None  # the float32 head weight whose 8-bit form self.weight reads

    def __getattr__(self, name: str):  # generate_step and make_prompt_cache read model attributes (layers, ...)
        return getattr(self.model, name)

    def _point_at_head(self) -> bool:
        """Point self.weight at the head's kept 8-bit form (again if the head changed); False: there is none."""
        head = _head_module(self.model)
        w = None if head is None else head.weight
        if self.pointed_at is w and QUANTIZED_DECODE.enabled():
            return True
        self.pointed_at = None
        _drop_replaced_quantized(self.model)  # after a model.update: the old weights are not held on to
        if w is None or "bias" in head or not _point_at_quantized(self.weight, self.model, w):
            return False
        self.pointed_at = w
        return True

    def __call__(self, inputs: mx.array, cache: Sequence[Any] | None = None, input_embeddings=None, **kwargs):
        if inputs.shape != (1, 1) or input_embeddings is not None or kwargs or not self._point_at_head():
            return self.model(inputs, cache=cache, input_embeddings=input_embeddings, **kwargs)
        row = np.array(self.inner(inputs, cache=cache)[0, -1].astype(mx.float32))
        logits = np.empty(self.pointed_at.shape[0], dtype=np.float32)
        cpu_kernels.weight_times_row(self.weight, row, logits)
        return mx.array(logits)[None, None]


def _head_module(model: nn.Module) -> nn.Module | None:
    """The module whose weight is the model's LM head: its lm_head, or the tied embedding (None: not a plain head)."""
    head = lm_head_of(model)
    return head.__self__ if inspect.ismethod(head) else head  # a tied embedding's as_linear, or the head module


def has_quantized_head(model: nn.Module) -> bool:
    """The model's LM head (or tied embedding) has a quantized form kept (keep_quantized) for QuantizedHead."""
    module = _head_module(model)
    return module is not None and _quantized_of(model, module.weight) is not None


def compiled_decoder(model: nn.Module) -> nn.Module | CompiledDecoder | QuantizedHead:
    """The C decoder of `model` where C_DECODE is on, else its compiled one (each made once, kept on the model); for
    another family, QuantizedHead where its head's 8-bit form was kept; else the model itself (the step off:
    set_compiled_decode, or nothing to gain)."""
    if not compiled_decode_enabled():
        return model
    if not supports(model):
        if not (C_DECODE.enabled() and QUANTIZED_DECODE.enabled() and has_quantized_head(model)):
            return model
        kind = QuantizedHead
    else:
        kind = CDecoder if C_DECODE.enabled() else CompiledDecoder
    decoder = model.__dict__.get(f"_kvpred_{kind.__name__}")
    if decoder is None:
        decoder = kind(model)
        object.__setattr__(model, f"_kvpred_{kind.__name__}", decoder)
    return decoder


def supports(model: nn.Module) -> bool:
    """The model is of a supported architecture, with its attention's usual parts, a SwiGLU MLP, plain Linear
    projections, one pairwise-rotation RoPE for every block and a plain LM head."""
    if type(model).__module__ not in SUPPORTED_MODULES or lm_head_of(model) is None:
        return False
    blocks = backbone(model).layers
    parts = ("q_proj", "k_proj", "v_proj", "o_proj", "rope")
    if not all(all(n in b for n in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp"))
               and all(n in b.self_attn for n in parts)
               and all(n in b.mlp for n in ("gate_proj", "up_proj", "down_proj")) for b in blocks):
        return False
    for b in blocks:
        groups = ([b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj], [b.mlp.gate_proj, b.mlp.up_proj,
                                                                                   b.mlp.down_proj])
        if not all(type(m) is nn.Linear for m in [*groups[0], b.self_attn.o_proj, *groups[1]]):
            return False  # quantized (GPU) or LoRA projections: the step reads plain weights
        if any(len({"bias" in m for m in g}) > 1 for g in groups):
            return False  # biases on all of a group's projections or on none (BlockWeights' bias tuples)
    rope = blocks[0].self_attn.rope
    if not all(hasattr(rope, a) for a in ("dims", "traditional")):
        return False
    return all(rope_key(b.self_attn.rope) == rope_key(rope) for b in blocks)
