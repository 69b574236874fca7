"""Tiny random-weight mlx-lm models (as mlx-lm's own tests build them) and the real model, if installed."""

import mlx_kvpred  # noqa: F401  (fast BLAS before mlx)

import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_map
from mlx_lm.models.cache import RotatingKVCache

from mlx_kvpred.loading import LoadedModel, model_class

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
                  rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=97, head_dim=16,
                  rope_theta=1000000.0, max_position_embeddings=512, tie_word_embeddings=True),
    # gemma3: seven layers (local, 5x, then global at 5, local at 6) and a window of 8, so prompts cross it
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=7, intermediate_size=96,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, vocab_size=97,
                   rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=16, sliding_window=8,
                   sliding_window_pattern=6, max_position_embeddings=512),
    "openelm": dict(model_type="openelm", head_dim=16, num_transformer_layers=4, model_dim=64, vocab_size=97,
                    ffn_dim_divisor=8, num_query_heads=[4, 4, 6, 6], num_kv_heads=[1, 2, 2, 3],
                    ffn_multipliers=[0.5, 1.0, 1.5, 2.0], normalize_qk_projections=True, rms_norm_eps=1e-6,
                    rope_freq_constant=10000, max_context_length=512),
}


class TinyDetokenizer:
    """mlx-lm's streaming detokenizer interface: each token reads " <id>"; last_segment is the text since the
    last read."""

    def reset(self):
        self._pending = ""

    def add_token(self, token):
        self._pending += f" {token}"

    def finalize(self):
        pass

    @property
    def last_segment(self):
        segment, self._pending = self._pending, ""
        return segment


class TinyTokenizer:
    """What generation needs of a tokenizer, for tiny models: no EOS (answers run to max_tokens)."""

    eos_token_ids: set = set()
    chat_template = None

    def __init__(self):
        self.detokenizer = TinyDetokenizer()


@pytest.fixture(autouse=True)
def rates_cache_dir(tmp_path_factory, monkeypatch):
    """Auto mode's speed probe writes to a test directory, never the user's cache."""
    monkeypatch.setenv("KVPRED_MLX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kvpred-cache"))


def tiny_model(arch: str, seed: int = 0, **overrides) -> LoadedModel:
    """A random-weight fp32 model of `arch`; weights scaled up so attention is far from uniform."""
    config = {**TINY_CONFIGS[arch], **overrides}
    mx.random.seed(seed)
    Model, Args = model_class(config)
    model = Model(Args.from_dict(config))
    if config["model_type"] == "gemma3_text":
        model.sanitize({})  # no lm_head weight: tied to the embedding, as the real Gemma 3 270M is
    model.update(tree_map(lambda p: p * 2.0 if p.ndim == 2 else p, model.parameters()))
    mx.eval(model.parameters())
    return LoadedModel(model, TinyTokenizer(), config, f"tiny-{arch}")


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny(request) -> LoadedModel:
    return tiny_model(request.param)


def cli(*args, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`kvpred-mlx ARGS` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", "from mlx_kvpred.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, input=stdin, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Bad input: exit code 2 and one `error: ...` line on stderr, no traceback, naming each fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def attended(cache, which: int = 0) -> mx.array:
    """A cache's keys (which=0) or values (1) that later queries can attend to, oldest first: for a RotatingKVCache
    the last window - 1 positions (its buffer is in temporal order after multi-token updates), else all."""
    x = cache.state[which]
    if isinstance(cache, RotatingKVCache):
        assert cache._idx == x.shape[2], "buffer not in temporal order"
        return x[..., -min(cache.offset, cache.max_size - 1):, :]
    return x


def write_true_kv(model, tokens: mx.array, true_cache: list, cache: list) -> None:
    """Run `model` over `tokens` (1, L) into `true_cache`, recording its pre-norm pre-RoPE K/V, and write those into
    `cache` as predicted K/V (write_predicted_kv): placed right, the two caches attend alike."""
    from mlx_kvpred.attention import tap_kv
    from mlx_kvpred.cache import write_predicted_kv

    with tap_kv(model.layers) as rec:
        model(tokens, cache=true_cache)
    write_predicted_kv(model.layers, cache, [k[0] for k in rec.keys], [v[0] for v in rec.values])
