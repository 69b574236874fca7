"""Training on tiny random models: it learns, checkpoints atomically, resumes after kill -9, fails cleanly."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_model
from mlx_kvpred.auxiliary import exact_aux_layers, make_layer_pruned_aux
from mlx_kvpred.bundle import load_bundle, new_bundle, shared_base_layers
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.predictor import layer_pruned_map
from mlx_kvpred.pipeline import Pipeline, predict_cache
from mlx_kvpred.train import (TrainConfig, aux_kv, base_targets, batch_indices, distill_loss, lr_at, ridge_init,
                              student_logits, train)

TESTS = Path(__file__).parent

# A script run in a subprocess so that it can be killed with SIGKILL mid-training.
SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import numpy as np
from conftest import tiny_model
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.bundle import enable_aux_lora, new_bundle
from mlx_kvpred.train import TrainConfig, train
base = tiny_model("llama", num_hidden_layers=4)
aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 2])
bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=[0, 0, 1, 1], aux_layers=[0, 2])
rank = int(sys.argv[4])
if rank:
    enable_aux_lora(bundle, rank=rank, scale=1.0)
seqs = np.random.default_rng(0).integers(0, 97, (10, 32)).astype(np.int32)
kill_at = int(sys.argv[2])
def on_step(state, row):
    if state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
cfg = TrainConfig(steps=12, seq_len=32, ridge_sequences=4, checkpoint_every=3, eval_every=100, lr=3e-3,
                  aux_lora_rank=rank, aux_lora_scale=1.0)
train(base, bundle, seqs, cfg, sys.argv[1], resume=sys.argv[3] == "resume", on_step=on_step)
"""


def run_script(out, kill_at, mode, rank=0):
    return subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS)), str(out), str(kill_at), mode,
                           str(rank)], capture_output=True, text=True, timeout=300)


def predictor_weights(out):
    return mx.load(str(Path(out) / "model.safetensors"))


@pytest.mark.parametrize("rank", [0, 2], ids=["predictor", "predictor+aux-lora"])
def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path, rank):
    straight = run_script(tmp_path / "a", -1, "fresh", rank)
    assert straight.returncode == 0, straight.stderr
    killed = run_script(tmp_path / "b", 8, "fresh", rank)  # checkpoints at 3 and 6, killed at 8
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6
    assert not list((tmp_path / "b").glob(".*"))  # no temp files left behind by atomic writes
    resumed = run_script(tmp_path / "b", -1, "resume", rank)
    assert resumed.returncode == 0, resumed.stderr
    a, b = predictor_weights(tmp_path / "a"), predictor_weights(tmp_path / "b")
    assert a.keys() == b.keys() and any("lora_b" in k for k in a) == bool(rank)
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-3).item(), k  # fp16 on disk
    final = json.loads((tmp_path / "b" / "kvp_config.json").read_text())
    assert final["trained"] and final["training"]["steps_done"] == 12


@pytest.mark.parametrize("predictor_input,kept,exact,prev", [("kv", [0, 3], False, 0), ("hidden", [0, 1], True, 0),
                                                            ("hidden", [0, 1], True, 8)])
def test_training_lowers_the_distillation_loss(tmp_path, predictor_input, kept, exact, prev):
    """Ridge init, then distillation: the KL to the base's true-cache logits falls on the data trained on.
    (Agreement on random-weight models is noise; accuracy on real text comes from `kvpred-mlx eval`.)
    The hidden case copies the aux's layers, so training skips them (shared_base_layers)."""
    base = tiny_model("qwen3", num_hidden_layers=6)
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    lmap = layer_pruned_map(kept, 6)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=lmap, aux_layers=kept,
                        predictor_input=predictor_input, exact_layers=exact_aux_layers(kept, lmap) if exact else None,
                        prev_token_dim=prev)
    seqs = np.random.default_rng(0).integers(0, 97, (8, 48)).astype(np.int32)
    cfg = TrainConfig(steps=40, seq_len=48, ridge_sequences=8, checkpoint_every=20, lr=3e-3, batch_size=8)

    def kl():
        tokens = mx.array(seqs)
        ak, av, ah, _ = aux_kv(bundle.aux, tokens)
        tl, tk, tv = base_targets(base.model, tokens)
        return distill_loss(bundle.predictor, base.model, tokens, ak, av, ah, tl, tk, tv, cfg=cfg,
                            l1_weight=0.0)[1]["kl"].item()

    ridge_init(bundle, base.model, seqs)
    after_ridge = kl()
    train(base, bundle, seqs, cfg, tmp_path / "b", resume=False)
    after_training = kl()
    assert after_training < 0.7 * after_ridge, (after_ridge, after_training)
    loaded = load_bundle(tmp_path / "b", base)
    assert loaded.config.trained and loaded.config.predictor_input == predictor_input
    assert loaded.config.exact_layers == (kept if exact else [])


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    base = tiny_model("llama")
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 2])
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=[0, 0, 1, 1], aux_layers=[0, 2])
    seqs = np.random.default_rng(0).integers(0, 97, (6, 16)).astype(np.int32)
    train(base, bundle, seqs, TrainConfig(steps=2, seq_len=16, ridge_sequences=0, checkpoint_every=2), tmp_path / "b")
    with pytest.raises(KVPredError, match=r"non-finite loss at step 4.*\(step 2\)"):
        train(base, bundle, seqs, TrainConfig(steps=4, seq_len=16, ridge_sequences=0, checkpoint_every=2, lr=float("nan")),
              tmp_path / "b", resume=True)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_schedule_and_data_order_are_deterministic():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    seen = np.concatenate([batch_indices(s, 10, 2, seed=3) for s in range(5)])
    assert sorted(seen) == list(range(10))  # one epoch = a permutation
    assert (batch_indices(7, 10, 2, seed=3) == batch_indices(7, 10, 2, seed=3)).all()


def lora_bundle(base, kept, rank=2):
    from mlx_kvpred.bundle import enable_aux_lora

    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, len(base.model.layers)),
                        aux_layers=kept)
    enable_aux_lora(bundle, rank=rank, scale=1.0)
    return bundle


def test_aux_lora_trains_factors_only_and_round_trips(tmp_path):
    """With --aux-lora-rank the aux's LoRA factors train with the predictor; the base's arrays (shared by the
    aux) stay untouched, the bundle stores only factors + predictor, and loading it gives the trained aux."""
    base = tiny_model("llama", num_hidden_layers=4)
    before = {k: mx.array(v) for k, v in tree_flatten(base.model.parameters())}
    bundle = lora_bundle(base, [0, 2])
    seqs = np.random.default_rng(0).integers(0, 97, (8, 32)).astype(np.int32)
    cfg = TrainConfig(steps=20, seq_len=32, ridge_sequences=4, checkpoint_every=10, lr=3e-3, batch_size=4,
                      aux_lora_rank=2, aux_lora_scale=1.0)
    tokens = mx.array(seqs)
    tl, tk, tv = base_targets(base.model, tokens)

    def kl():
        ak, av, ah, _ = aux_kv(bundle.aux, tokens)
        return distill_loss(bundle.predictor, base.model, tokens, ak, av, ah, tl, tk, tv, cfg=cfg,
                            l1_weight=0.0)[1]["kl"].item()

    ridge_init(bundle, base.model, seqs[:4])
    after_ridge = kl()
    train(base, bundle, seqs, cfg, tmp_path / "b")
    assert kl() < 0.7 * after_ridge
    for k, v in tree_flatten(base.model.parameters()):
        assert mx.array_equal(v, before[k]).item(), k
    lora_b = [v for k, v in tree_flatten(bundle.aux.parameters()) if k.endswith("lora_b")]
    # 7 linears per llama layer, the first LoRA layer's K/V projections left out (its K/V stay the base's)
    assert len(lora_b) == 7 + 5 and any(mx.abs(b).max().item() > 0 for b in lora_b)

    stored = mx.load(str(tmp_path / "b" / "model.safetensors"))
    aux_keys = [k for k in stored if k.startswith("aux.")]
    assert aux_keys and all(k.endswith((".lora_a", ".lora_b")) for k in aux_keys), aux_keys
    saved_cfg = json.loads((tmp_path / "b" / "kvp_config.json").read_text())
    assert saved_cfg["aux_lora"] == {"rank": 2, "scale": 1.0, "layers": [0, 1], "frozen_kv": [0]}
    assert saved_cfg["format_version"] == 5
    loaded = load_bundle(tmp_path / "b", base)
    (k1, v1, *_), (k2, v2, *_) = aux_kv(bundle.aux, tokens), aux_kv(loaded.aux, tokens)
    for a, b in zip(k1 + v1, k2 + v2):
        assert mx.allclose(a, b, atol=2e-2, rtol=2e-2).item()  # fp16 factors on disk
    broken = tmp_path / "broken"  # a bundle without its factors is refused
    broken.mkdir()
    (broken / "kvp_config.json").write_text(json.dumps(saved_cfg))
    mx.save_safetensors(str(broken / "model.safetensors"), {k: v for k, v in stored.items() if "lora_a" not in k})
    with pytest.raises(KVPredError, match="missing LoRA factors"):
        load_bundle(broken, base)


def test_resume_refuses_other_options(tmp_path):
    base = tiny_model("llama")
    seqs = np.random.default_rng(0).integers(0, 97, (6, 16)).astype(np.int32)
    bundle = lora_bundle(base, [0, 2])
    cfg = TrainConfig(steps=2, seq_len=16, ridge_sequences=0, checkpoint_every=2, aux_lora_rank=2, aux_lora_scale=1.0)
    train(base, bundle, seqs, cfg, tmp_path / "b")
    other = TrainConfig(steps=4, seq_len=16, ridge_sequences=0, checkpoint_every=2, aux_lora_rank=2, aux_lora_scale=0.5)
    with pytest.raises(KVPredError, match="aux_lora_scale=1.0 \\(now 0.5\\)"):
        train(base, lora_bundle(base, [0, 2]), seqs, other, tmp_path / "b", resume=True)
    plain = TrainConfig(steps=4, seq_len=16, ridge_sequences=0, checkpoint_every=2)
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 2])
    no_lora = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=[0, 0, 1, 1], aux_layers=[0, 2])
    with pytest.raises(KVPredError, match="aux_lora_rank=2 \\(now 0\\)"):
        train(base, no_lora, seqs, plain, tmp_path / "b", resume=True)
    resumed = train(base, lora_bundle(base, [0, 2]), seqs, TrainConfig(**{**cfg.__dict__, "steps": 4}), tmp_path / "b",
                    resume=True)
    assert resumed.step == 4


def test_lora_aux_in_the_pipeline_and_flops():
    """An aux with LoRA factors runs in the pipeline: B = 0 keeps KVP exact (aux = all layers, identity
    predictor); a non-zero B changes the predicted cache; TTFT FLOPs count the factors."""
    from mlx_kvpred.flops import kvp_ttft_flops
    from mlx_kvpred.pipeline import Pipeline, generate_tokens

    base = tiny_model("llama")
    plain_aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 1, 2, 3])
    bundle = lora_bundle(base, [0, 1, 2, 3], rank=2)
    bundle.predictor.set_identity()
    prompt = mx.array(np.random.default_rng(1).integers(0, 97, 24).astype(np.int32))

    def first_logits(mode):
        return next(generate_tokens(Pipeline(base, bundle), prompt, mode=mode, max_tokens=1))[1]

    assert mx.allclose(first_logits("kvp"), first_logits("base"), atol=1e-4).item()
    k_proj = bundle.aux.layers[1].self_attn.k_proj
    k_proj.lora_b = mx.random.normal(k_proj.lora_b.shape)
    assert not mx.allclose(first_logits("kvp"), first_logits("base"), atol=1e-2).item()
    n = 24
    extra = kvp_ttft_flops(base.model, base.config, bundle.aux, bundle.predictor, n) - kvp_ttft_flops(
        base.model, base.config, plain_aux, bundle.predictor, n)
    factors = sum(v.size for k, v in tree_flatten(bundle.aux.parameters()) if "lora_" in k)
    assert extra == 2 * factors * (n - 1)  # the aux reads prompt[:-1]


def test_skipping_the_aux_layers_gives_the_same_loss_and_gradients():
    """lp training starts teacher and student at the first non-aux layer from the aux's residual stream:
    the loss and its gradients must equal the full forward's."""
    base = tiny_model("llama", num_hidden_layers=5)
    kept = [0, 1]
    lmap = layer_pruned_map(kept, 5)
    bundle = new_bundle(base, make_layer_pruned_aux(base.model, base.config, kept)[0], aux_kind="layer_pruned",
                        layer_map=lmap, aux_layers=kept, predictor_input="hidden",
                        exact_layers=exact_aux_layers(kept, lmap))
    tokens = mx.array(np.random.default_rng(1).integers(0, 97, (2, 24)).astype(np.int32))
    ridge_init(bundle, base.model, np.array(tokens))
    skip = shared_base_layers(bundle, base.model)
    assert skip == 2
    cfg = TrainConfig(seq_len=24, true_kv_tail=0)
    ak, av, ah, res = aux_kv(bundle.aux, tokens, residual_at=2)

    def loss_and_grads(first):
        targets = base_targets(base.model, tokens, first=first, residual=res if first else None)

        def loss(predictor):
            return distill_loss(predictor, base.model, tokens, ak, av, ah, *targets, cfg=cfg, l1_weight=0.1,
                                first=first, residual=res if first else None)[0]
        return nn.value_and_grad(bundle.predictor, lambda: loss(bundle.predictor))()

    (full, g_full), (skipped, g_skip) = loss_and_grads(0), loss_and_grads(skip)
    assert abs(full.item() - skipped.item()) < 1e-5 * max(1.0, abs(full.item()))
    for (k, a), (_, b) in zip(tree_flatten(g_full), tree_flatten(g_skip)):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-4).item(), k
    assert len(base.model.layers) == 5  # restored
    # nothing to skip: an aux of spread layers, or one that predicts (not copies) its own layers
    spread = new_bundle(base, make_layer_pruned_aux(base.model, base.config, [0, 2])[0], aux_kind="layer_pruned",
                        layer_map=layer_pruned_map([0, 2], 5), aux_layers=[0, 2], exact_layers=[0, 2])
    plain = new_bundle(base, bundle.aux, aux_kind="layer_pruned", layer_map=lmap, aux_layers=kept)
    assert shared_base_layers(spread, base.model) == 0 and shared_base_layers(plain, base.model) == 0


@pytest.mark.parametrize("prev,head", [(0, 0), (4, 0), (4, 1), (0, 3)])
def test_true_kv_tail_positions_see_what_inference_sees(prev, head):
    """With true_kv_tail N (and true_kv_head H), the training forward's last N positions are the inference
    condition: the logits equal those of the base running those tokens on predict_cache's cache of the tokens
    before them (whose first H positions the base computes itself, exact_head H)."""
    base = tiny_model("llama", num_hidden_layers=5)
    kept = [0, 1]
    lmap = layer_pruned_map(kept, 5)
    bundle = new_bundle(base, make_layer_pruned_aux(base.model, base.config, kept)[0], aux_kind="layer_pruned",
                        layer_map=lmap, aux_layers=kept, predictor_input="hidden",
                        exact_layers=exact_aux_layers(kept, lmap), prev_token_dim=prev)
    rng = np.random.default_rng(3)
    ridge_init(bundle, base.model, rng.integers(0, 97, (2, 24)).astype(np.int32))  # fit on other text: inexact
    tokens = mx.array(rng.integers(0, 97, (1, 24)).astype(np.int32))
    tail = 6
    cache = predict_cache(Pipeline(base, bundle, exact_head=head), tokens[0, :-tail])
    inference = base.model(tokens[:, -tail:], cache=cache)
    ak, av, ah, res = aux_kv(bundle.aux, tokens, residual_at=2)
    for first in (0, 2):  # from the embeddings, or skipping the exact aux layers
        mixed = student_logits(bundle.predictor, base.model, tokens, ak, av, ah, true_kv_tail=tail,
                               true_kv_head=head, first=first, residual=res if first else None)[0]
        assert mx.allclose(mixed[:, -tail:], inference, atol=1e-4, rtol=1e-4).item()
    other_head = student_logits(bundle.predictor, base.model, tokens, ak, av, ah, true_kv_tail=tail,
                                true_kv_head=1 - min(head, 1))[0]
    assert not mx.allclose(other_head[:, -tail:], inference, atol=1e-3).item()  # the head matters
    predicted = student_logits(bundle.predictor, base.model, tokens, ak, av, ah)[0]
    if head:  # the head's positions are the base's own
        assert mx.allclose(mixed[:, :head], base.model(tokens[:, :head]), atol=1e-4, rtol=1e-4).item()
    else:  # earlier positions: unchanged by the tail
        assert mx.allclose(predicted[:, :-tail], mixed[:, :-tail], atol=1e-5).item()
    assert not mx.allclose(predicted[:, -tail:], inference, atol=1e-2).item()  # all-predicted is another condition


def test_lora_on_the_last_aux_layer_keeps_exact_layers_and_skips_to_it():
    """--aux-lora-layers on the aux's last layer: its K/V projections stay the base's, so every aux layer's
    K/V are still exact (copied); training skips the frozen layers before it, with the same loss and the same
    gradients (LoRA factors included) as the full forward."""
    from mlx_kvpred.auxiliary import aux_lora_config, unchanged_kv_layers
    from mlx_kvpred.bundle import enable_aux_lora
    from mlx_kvpred.train import Trainable, step_inputs, step_loss

    base = tiny_model("llama", num_hidden_layers=5)
    kept = [0, 1, 2]
    lmap = layer_pruned_map(kept, 5)
    lora = aux_lora_config(rank=2, scale=1.0, layers=[2])
    exact = exact_aux_layers(kept, lmap, unchanged_kv_layers(lora, len(kept)))
    assert exact == [0, 1, 2] and exact_aux_layers(kept, lmap, unchanged_kv_layers(
        aux_lora_config(rank=2, scale=1.0, layers=[1, 2]), len(kept))) == [0, 1]
    bundle = new_bundle(base, make_layer_pruned_aux(base.model, base.config, kept)[0], aux_kind="layer_pruned",
                        layer_map=lmap, aux_layers=kept, predictor_input="hidden", exact_layers=exact)
    with pytest.raises(ValueError, match="exact layers"):  # LoRA on layer 1 would change layer 2's K/V
        enable_aux_lora(new_bundle(base, make_layer_pruned_aux(base.model, base.config, kept)[0],
                                   aux_kind="layer_pruned", layer_map=lmap, aux_layers=kept, exact_layers=exact),
                        rank=2, scale=1.0, layers=[1, 2])
    enable_aux_lora(bundle, rank=2, scale=1.0, layers=[2])
    attn = bundle.aux.layers[2].self_attn
    assert "lora_a" in attn.q_proj and "lora_a" not in attn.k_proj and "lora_a" not in attn.v_proj
    for name, m in bundle.aux.layers[2].named_modules():  # a trained-looking LoRA: B != 0
        if "lora_b" in m:
            m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape, key=mx.random.key(len(name)))
    tokens = mx.array(np.random.default_rng(1).integers(0, 97, (2, 24)).astype(np.int32))
    ridge_init(bundle, base.model, np.array(tokens))
    ak, av, hidden, _ = aux_kv(bundle.aux, tokens)
    _, tk, tv = base_targets(base.model, tokens)
    for j in range(3):  # the aux's K/V are the base's, its hidden state is not
        assert mx.allclose(ak[j], tk[j], atol=1e-5).item() and mx.allclose(av[j], tv[j], atol=1e-5).item()
    plain_hidden = aux_kv(make_layer_pruned_aux(base.model, base.config, kept)[0], tokens)[2]
    assert not mx.allclose(hidden, plain_hidden, atol=1e-3).item()

    skip = shared_base_layers(bundle, base.model)
    assert skip == 2
    bundle.aux.freeze()
    bundle.aux.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    trainable = Trainable(bundle.predictor, bundle.aux)

    def loss_and_grads(first):
        inputs = step_inputs(bundle, base.model, tokens, skip=first)
        return nn.value_and_grad(trainable, lambda: step_loss(bundle, base.model, tokens, inputs, cfg=TrainConfig(
            seq_len=24, true_kv_tail=0), l1_weight=0.1, skip=first))()

    (full, g_full), (skipped, g_skip) = loss_and_grads(0), loss_and_grads(skip)
    assert abs(full.item() - skipped.item()) < 1e-5 * max(1.0, abs(full.item()))
    flat_full, flat_skip = tree_flatten(g_full), tree_flatten(g_skip)
    assert any("lora_b" in k for k, _ in flat_full) and [k for k, _ in flat_full] == [k for k, _ in flat_skip]
    for (k, a), (_, b) in zip(flat_full, flat_skip):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-4).item(), k


def test_ridge_fits_the_previous_token_projection():
    """ridge_init with prev_token_dim: a reduced-rank fit of the previous token's hidden state on top of the
    current one: its K/V error on the fitted text is below the current-token-only fit, and falls with the rank."""
    base = tiny_model("llama", num_hidden_layers=5)
    kept = [0, 1]
    lmap = layer_pruned_map(kept, 5)
    tokens = np.random.default_rng(2).integers(0, 97, (6, 40)).astype(np.int32)

    def kv_error(prev_token_dim):
        bundle = new_bundle(base, make_layer_pruned_aux(base.model, base.config, kept)[0], aux_kind="layer_pruned",
                            layer_map=lmap, aux_layers=kept, predictor_input="hidden",
                            exact_layers=exact_aux_layers(kept, lmap), prev_token_dim=prev_token_dim)
        ridge_init(bundle, base.model, tokens, lam=1e-6)
        x = mx.array(tokens)
        ak, av, ah, _ = aux_kv(bundle.aux, x)
        _, tk, tv = base_targets(base.model, x)
        pk, pv = bundle.predictor(ak, av, ah)
        return sum(mx.mean((a - b) ** 2).item() for a, b in zip(pk[2:] + pv[2:], tk[2:] + tv[2:]))

    none, low, full = kv_error(0), kv_error(8), kv_error(64)
    assert full < low < 0.95 * none, (none, low, full)


def test_tail_kl_weight_weighs_the_true_kv_tail_positions():
    """tail_kl_weight w: the KL is the mean over positions with the true-K/V tail's counted w times (1: the plain
    mean); the tail's positions are the ones whose logits inference reads."""
    base = tiny_model("llama", num_hidden_layers=4)
    bundle = new_bundle(base, make_layer_pruned_aux(base.model, base.config, [0, 2])[0], aux_kind="layer_pruned",
                        layer_map=layer_pruned_map([0, 2], 4), aux_layers=[0, 2])
    tokens = mx.array(np.random.default_rng(2).integers(0, 97, (1, 20)).astype(np.int32))
    ridge_init(bundle, base.model, np.array(tokens))
    tl, tk, tv = base_targets(base.model, tokens)
    ak, av, ah, _ = aux_kv(bundle.aux, tokens)
    tail = 5
    student = student_logits(bundle.predictor, base.model, tokens, ak, av, ah, true_kv_tail=tail)[0]
    p, q = (np.array(mx.softmax(x.astype(mx.float32), axis=-1)[0], dtype=np.float64) for x in (tl, student))
    per_position = (p * (np.log(p) - np.log(q))).sum(-1)
    for w in (1.0, 4.0):
        cfg = TrainConfig(seq_len=20, true_kv_tail=tail, tail_kl_weight=w)
        kl = distill_loss(bundle.predictor, base.model, tokens, ak, av, ah, tl, tk, tv, cfg=cfg, l1_weight=0.0)[1]["kl"]
        weights = np.r_[np.ones(20 - tail), np.full(tail, w)]
        assert np.isclose(kl.item(), (per_position * weights).sum() / weights.sum(), rtol=1e-3, atol=1e-6)
    with pytest.raises(KVPredError, match="tail_kl_weight"):
        TrainConfig(tail_kl_weight=0)
