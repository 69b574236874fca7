"""Train a KV predictor on-device: closed-form (ridge) init, then distillation with the base attending to
predicted K/V at every position but an optional tail that keeps its own, as at inference (KL to the base's
true-cache logits) + L1 K/V consistency (+ optional CE).

The base is frozen. The aux is frozen too (its layers are the base's own), unless it carries LoRA factors
(`aux_lora_rank`, on `aux_lora_layers`): then those train with the predictor, and the bundle stores only the factors.
Checkpoints are atomic; `resume` continues after a kill -9.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .attention import backbone, embed, lm_head_of, run_blocks, tap_kv
from .atomic import atomic_write
from .bundle import Bundle, save_bundle, shared_base_layers
from .backends import for_device
from .errors import KVPredError
from .loading import LoadedModel
from .predictor import PredictorConfig, previous_positions

CHECKPOINT_DIR = "checkpoint"
# Peak lr per predictor input: Adam moves each output by ~lr x the input's L1 norm, 2-5x larger for "hidden"
DEFAULT_LR = {"kv": 1e-3, "hidden": 3e-4}


@dataclass
class TrainConfig:
    """The optimisation of a training run; the defaults are the shipped bundle's (see recipe.TrainSpec)."""

    steps: int = 1000
    batch_size: int = 1
    seq_len: int = 256
    lr: float | None = None  # peak, linear warmup then cosine to lr * min_lr_ratio; None: DEFAULT_LR of the input
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # decays towards zero, away from the ridge solution: off
    kl_weight: float = 1.0  # distillation: KL(base true-cache logits || base predicted-cache logits)
    ce_weight: float = 0.0  # base CE on the data's next tokens (the paper's loss)
    true_kv_tail: int | None = None  # the last N positions attend with their own K/V, as the last prompt token
    # and generated tokens do at inference; None: seq_len // 4; 0: all predicted (CoreNet's objective)
    tail_kl_weight: float = 1.0  # the KL of the true-K/V tail's positions (where inference reads logits: the end of
    # the question and the answer) weighs this many times the rest's
    true_kv_head: int = 0  # the first N positions attend with their own K/V, as the base's exact head does at
    # inference (the attention sink, position 0, is what a per-token map predicts worst)
    l1_weight: float | None = None  # K/V L1 summed over layers; None -> 1 / n_base_layers (the paper's best)
    ridge_sequences: int = 256  # sequences for the closed-form init; 0: none
    ridge_lambda: float = 1e-3  # relative to the mean diagonal of X^T X
    aux_lora_rank: int = 0  # > 0: train LoRA factors of this rank on the aux linears (KVP-LP only)
    aux_lora_scale: float = 0.5  # LoRA output scale; under Adam it sets the LoRA step size relative to lr
    aux_lora_layers: list[int] | None = None  # the aux layers with LoRA factors (None: all)
    eval_every: int = 100
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self):
        for name, value in (("seq_len", self.seq_len), ("batch_size", self.batch_size), ("steps", self.steps),
                            ("eval_every", self.eval_every), ("checkpoint_every", self.checkpoint_every)):
            if value < 1:
                raise KVPredError(f"{name} must be >= 1, got {value}", name)
        if self.ridge_sequences < 0 or self.aux_lora_rank < 0:
            raise KVPredError("ridge_sequences and aux_lora_rank must be >= 0", "ridge_sequences", "aux_lora_rank")
        if self.true_kv_tail is None:
            self.true_kv_tail = self.seq_len // 4
        if not 0 <= self.true_kv_tail < self.seq_len:
            raise KVPredError(f"true_kv_tail must be in 0..{self.seq_len - 1} (below seq_len), "
                              f"got {self.true_kv_tail}", "true_kv_tail", "seq_len")
        if self.tail_kl_weight <= 0:
            raise KVPredError(f"tail_kl_weight must be > 0, got {self.tail_kl_weight}", "tail_kl_weight")
        if not 0 <= self.true_kv_head < self.seq_len - self.true_kv_tail:
            raise KVPredError(f"true_kv_head must be in 0..{self.seq_len - self.true_kv_tail - 1} (with "
                              f"true_kv_tail, below seq_len), got {self.true_kv_head}", "true_kv_head", "true_kv_tail",
                              "seq_len")


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "tokens", "tok_s"}
    evals: list[dict] = field(default_factory=list)
    ridge_done: bool = False
    elapsed: float = 0.0


def aux_kv(aux: nn.Module, tokens: mx.array, *, residual_at: int | None = None, first: int = 0,
           residual: mx.array | None = None) -> tuple[list[mx.array], list[mx.array], mx.array, mx.array | None]:
    """Pre-norm pre-RoPE K/V of the aux layers first.. for `tokens` (B, T) (from `residual`, the stream entering
    layer `first`), the aux's final normed hidden state (lazy: only evaluated where a predictor reads it) and,
    with `residual_at` k, the residual stream entering aux layer k (k = n_layers: the final norm; else None).
    The aux LM head never runs."""
    layers = backbone(aux).layers
    n = len(layers)
    cuts = [first, n] if residual_at is None else [first, residual_at, n]
    keys, values, x, at = [], [], residual, None
    for lo, hi in zip(cuts, cuts[1:]):
        if lo < hi:
            with tap_kv(layers[lo:hi]) as rec:
                x = run_blocks(aux, embed(aux, tokens) if x is None else x, first=lo, stop=hi)
            keys += [k[0] for k in rec.keys]
            values += [v[0] for v in rec.values]
        if hi == residual_at:
            at = x
    return keys, values, backbone(aux).norm(x), at


def forward_from(model: nn.Module, tokens: mx.array, first: int = 0, residual: mx.array | None = None) -> mx.array:
    """Logits of `model` for `tokens`, running blocks first.. on `residual`, the stream entering block `first`."""
    if not first:
        return model(tokens)
    head = lm_head_of(model)
    if head is None:
        raise KVPredError(f"{type(model).__module__} models have no plain LM head to run from block {first}")
    return head(backbone(model).norm(run_blocks(model, residual, first=first)))


def base_targets(base: nn.Module, tokens: mx.array, *, first: int = 0, residual: mx.array | None = None
                 ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """The base's true-cache logits and pre-norm pre-RoPE K/V per layer (from layer `first`, given the
    residual stream entering it)."""
    with tap_kv(base.layers[first:]) as rec:
        logits = forward_from(base, tokens, first, residual)
    return logits, [k[0] for k in rec.keys], [v[0] for v in rec.values]


def _ridge_inputs(config: PredictorConfig, i: int) -> tuple[str, str]:
    """Names of base layer i's key and value transform inputs: "h" (aux hidden), "k<j>"/"v<j>" (aux layer j)."""
    j = config.layer_map[i]
    return ("h", "h") if config.input == "hidden" else (f"k{j}", f"v{j}")


def _with_bias(a: mx.array) -> np.ndarray:
    """(1, L, d) activations -> (L, d + 1) float64 with a ones column."""
    return np.concatenate([np.array(a[0], dtype=np.float64), np.ones((a.shape[1], 1))], axis=1)


def _hidden_features(aux_hidden: mx.array, prev_token_dim: int) -> mx.array:
    """Ridge input "h": the hidden state, and with prev_token_dim the previous position's in full (zeros first)."""
    if not prev_token_dim:
        return aux_hidden
    return mx.concatenate([aux_hidden, previous_positions(aux_hidden)], axis=-1)


def _ridge_solve(gram: np.ndarray, rhs: np.ndarray, lam: float) -> np.ndarray:
    """Ridge weights (d_in + 1, d_out) from X^T X and X^T Y, X's last column the bias (not shrunk)."""
    reg = lam * np.mean(np.diag(gram)) * np.eye(gram.shape[0])
    reg[-1, -1] = 0.0
    return np.linalg.solve(gram + reg, rhs)


def _reduce_prev_token(pred: nn.Module, gram: dict, rhs: dict, n_tokens: int, lam: float) -> None:
    """Fit the prev_token_proj (d -> r) as a reduced-rank regression: the top-r directions of the full
    previous-token block of the ridge fit, in whitened input coordinates; then express the "h" Gram and
    right-hand sides in the reduced features [h, proj(h_prev), 1]."""
    d, r = pred.config.aux_hidden_dim, pred.config.prev_token_dim
    g = gram["h"]
    w_prev = np.concatenate([_ridge_solve(g, v, lam) for v in rhs.values()], axis=1)[d:2 * d]
    mean = g[-1, :d] / n_tokens
    ev, evec = np.linalg.eigh(g[:d, :d] / n_tokens - np.outer(mean, mean))  # covariance of the hidden state
    ev = np.maximum(ev, 1e-6 * ev.max())
    u, _, _ = np.linalg.svd((evec * ev ** 0.5) @ evec.T @ w_prev, full_matrices=False)
    proj = (evec * ev ** -0.5) @ evec.T @ u[:, :r]  # (d, r)
    t = np.zeros((2 * d + 1, d + r + 1))  # [h, h_prev, 1] -> [h, proj(h_prev), 1]
    t[:d, :d], t[d:2 * d, d:d + r], t[-1, -1] = np.eye(d), proj, 1.0
    gram["h"] = t.T @ g @ t
    for key in rhs:
        rhs[key] = t.T @ rhs[key]
    pred.prev_token_proj.weight = mx.array(np.ascontiguousarray(proj.T, np.float32)).astype(pred.prev_token_proj.weight.dtype)


def ridge_init(bundle: Bundle, base: nn.Module, sequences: np.ndarray, *, lam: float = 1e-3,
               progress: Callable[[], None] | None = None) -> None:
    """Least-squares K/V maps from aux to base activations (with bias), one solve per learned transform
    (with prev_token_dim: a reduced-rank fit of the previous token's hidden state first)."""
    pred = bundle.predictor
    layers = pred.linear_layers
    prev_dim = pred.config.prev_token_dim
    gram: dict[str, np.ndarray] = {}  # X^T X per input
    rhs: dict[tuple[str, int], np.ndarray] = {}  # X^T Y per ("k" | "v", base layer)
    names = {name for i in layers for name in _ridge_inputs(pred.config, i)}
    n_tokens = 0
    for seq in sequences:
        x = mx.array(seq)[None]
        ak, av, ah, _ = aux_kv(bundle.aux, x)
        _, bk, bv = base_targets(base, x)
        ah = _hidden_features(ah, prev_dim) if pred.config.input == "hidden" else None
        mx.eval(ak, av, ah, bk, bv)
        n_tokens += x.shape[1]
        feats = {n: _with_bias(ah if n == "h" else (ak if n[0] == "k" else av)[int(n[1:])]) for n in names}
        for name, f in feats.items():
            gram[name] = gram.get(name, 0) + f.T @ f
        for i in layers:
            k_in, v_in = _ridge_inputs(pred.config, i)
            rhs["k", i] = rhs.get(("k", i), 0) + feats[k_in].T @ np.array(bk[i][0], dtype=np.float64)
            rhs["v", i] = rhs.get(("v", i), 0) + feats[v_in].T @ np.array(bv[i][0], dtype=np.float64)
        if progress:
            progress()
    if prev_dim and layers:
        _reduce_prev_token(pred, gram, rhs, n_tokens, lam)
    for i in layers:
        k_in, v_in = _ridge_inputs(pred.config, i)
        for lin, g, r in ((pred.key_transforms[i], gram[k_in], rhs["k", i]),
                          (pred.value_transforms[i], gram[v_in], rhs["v", i])):
            w = _ridge_solve(g, r, lam)
            lin.weight = mx.array(w[:-1].T.astype(np.float32)).astype(lin.weight.dtype)
            lin.bias = mx.array(w[-1].astype(np.float32)).astype(lin.bias.dtype)
    mx.eval(pred.parameters())


def student_logits(predictor: nn.Module, base: nn.Module, tokens: mx.array, aux_k, aux_v, aux_h, *,
                   true_kv_tail: int = 0, true_kv_head: int = 0, first: int = 0, residual: mx.array | None = None
                   ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """The base's logits for `tokens` attending to predicted K/V at every position but the first `true_kv_head`
    and the last `true_kv_tail`, which keep their own (as the base's exact head, the last prompt token and
    generated tokens do at inference), and the predicted K/V of layers first.. (with `first` > 0 the base starts
    at that layer from `residual`)."""
    pk, pv = predictor(aux_k, aux_v, aux_h)
    pk, pv = pk[first:], pv[first:]
    end = tokens.shape[1] - true_kv_tail

    def override(kind: str, i: int, projected: mx.array) -> mx.array:
        predicted = pk[i] if kind == "k" else pv[i]
        if not true_kv_tail and not true_kv_head:
            return predicted
        return mx.concatenate([projected[:, :true_kv_head], predicted[:, true_kv_head:end], projected[:, end:]],
                              axis=1)

    with tap_kv(base.layers[first:], override=override):
        logits = forward_from(base, tokens, first, residual)
    return logits, pk, pv


def distill_loss(predictor: nn.Module, base: nn.Module, tokens: mx.array, aux_k, aux_v, aux_h, teacher_logits,
                 true_k, true_v, cfg: TrainConfig, l1_weight: float, first: int = 0,
                 residual: mx.array | None = None) -> tuple[mx.array, dict]:
    """KL of `student_logits` to the base's true-cache logits + L1 to its true K/V (+ CE). With `first` > 0,
    true_k/true_v hold layers first.. only."""
    logits, pk, pv = student_logits(predictor, base, tokens, aux_k, aux_v, aux_h, true_kv_tail=cfg.true_kv_tail,
                                    true_kv_head=cfg.true_kv_head, first=first, residual=residual)
    h = cfg.true_kv_head  # the head's predictions are never used: no L1 on them
    parts = {}
    exp, logsumexp = for_device().loss_ops()
    logp = logits - logsumexp(logits, axis=-1, keepdims=True)
    t_logp = teacher_logits - logsumexp(teacher_logits, axis=-1, keepdims=True)
    kl = (exp(t_logp) * (t_logp - logp)).sum(-1)  # (B, T)
    if cfg.tail_kl_weight != 1 and cfg.true_kv_tail:
        n = kl.shape[1]
        weight = mx.concatenate([mx.ones(n - cfg.true_kv_tail), mx.full((cfg.true_kv_tail,), cfg.tail_kl_weight)])
        parts["kl"] = (kl * weight).sum(-1).mean() / weight.sum()
    else:
        parts["kl"] = kl.mean()
    parts["l1"] = sum(mx.abs(a[:, h:] - b[:, h:]).mean() for a, b in zip(pk, true_k)) + sum(
        mx.abs(a[:, h:] - b[:, h:]).mean() for a, b in zip(pv, true_v))
    loss = cfg.kl_weight * parts["kl"] + l1_weight * parts["l1"]
    if cfg.ce_weight:
        parts["ce"] = nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:]).mean()
        loss = loss + cfg.ce_weight * parts["ce"]
    return loss, parts


def step_inputs(bundle: Bundle, base: nn.Module, tokens: mx.array, *, skip: int) -> dict:
    """What a training step needs outside the gradient: the frozen aux's K/V and hidden state (with aux LoRA:
    of its layers before `skip` only), the residual stream entering layer `skip`, the base's targets from there."""
    ak, av, ah, res = aux_kv(bundle.aux, tokens, residual_at=skip if skip else None)
    if bundle.config.aux_lora:  # the graph is lazy: layers skip.. never run here
        ak, av, ah = ak[:skip], av[:skip], None
    tl, tk, tv = base_targets(base, tokens, first=skip, residual=res)
    return {"ak": ak, "av": av, "ah": ah if bundle.predictor.config.input == "hidden" else None, "res": res,
            "tl": tl, "tk": tk, "tv": tv}


def step_loss(bundle: Bundle, base: nn.Module, tokens: mx.array, inputs: dict, *, cfg: TrainConfig,
              l1_weight: float, skip: int) -> mx.array:
    """The training loss from `step_inputs`; an aux with LoRA runs its layers skip.. here, under the gradient."""
    ak, av, ah, res = inputs["ak"], inputs["av"], inputs["ah"], inputs["res"]
    if bundle.config.aux_lora:
        ak_lora, av_lora, ah, _ = aux_kv(bundle.aux, tokens, first=skip, residual=res)
        ak, av = ak[:skip] + ak_lora, av[:skip] + av_lora
    return distill_loss(bundle.predictor, base, tokens, ak, av, ah, inputs["tl"], inputs["tk"], inputs["tv"],
                        cfg=cfg, l1_weight=l1_weight, first=skip, residual=res)[0]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """The sequences of a step: a fresh seeded permutation per epoch, so a resumed run sees the same data."""
    idx = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        idx.append(np.random.default_rng([seed, epoch]).permutation(n)[pos])
    return np.array(idx)


class Trainable(nn.Module):
    """What the optimizer updates: the predictor, and the aux's LoRA factors when it has them."""

    def __init__(self, predictor: nn.Module, aux: nn.Module | None = None):
        super().__init__()
        self.predictor = predictor
        if aux is not None:
            self.aux = aux


# Options a resumed run must share with the run it continues (the rest, e.g. steps or eval_every, may change).
RESUME_FIXED = ("batch_size", "seq_len", "aux_lora_rank", "aux_lora_scale", "aux_lora_layers", "seed")


def _save_checkpoint(out: Path, trainable: Trainable, opt: optim.Optimizer, state: TrainState,
                     cfg: TrainConfig) -> None:
    ckpt = out / CHECKPOINT_DIR
    name = f"step-{state.step:07d}.safetensors"
    arrays = dict(tree_flatten(trainable.trainable_parameters()))
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(opt.state) if isinstance(v, mx.array)})
    atomic_write(ckpt / name, lambda tmp: mx.save_safetensors(tmp, arrays))
    atomic_write(ckpt / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {**asdict(state), "weights": name, "config": asdict(cfg)})))
    for old in ckpt.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_checkpoint(out: Path, trainable: Trainable, opt: optim.Optimizer, cfg: TrainConfig) -> TrainState:
    ckpt = out / CHECKPOINT_DIR
    try:
        raw = json.loads((ckpt / "state.json").read_text())
        arrays = mx.load(str(ckpt / raw.pop("weights")))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise KVPredError(f"resume: no usable checkpoint in {ckpt} ({e})", "resume") from e
    saved = raw.pop("config", None) or {}
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != asdict(cfg)[k]]
    if changed:
        raise KVPredError(f"resume: {ckpt} was trained with different options: "
                          + ", ".join(f"{k}={saved[k]} (now {asdict(cfg)[k]})" for k in changed), "resume")
    have = dict(tree_flatten(trainable.trainable_parameters()))
    weights = [(k, v) for k, v in arrays.items() if not k.startswith("optimizer.")]
    if {k for k, _ in weights} != set(have):
        raise KVPredError(f"resume: {ckpt} holds other trainable weights than this run "
                          "(a different aux, layer map or aux_lora_rank?)", "resume", "aux_lora_rank")
    trainable.load_weights(weights, strict=False)  # the frozen rest is the base's

    def state_name(k: str) -> str:  # checkpoints before aux LoRA kept predictor optimizer state at the top level
        return f"predictor.{k}" if k.startswith(("key_transforms.", "value_transforms.")) else k

    opt_state = [(state_name(k[len("optimizer."):]), v) for k, v in arrays.items() if k.startswith("optimizer.")]
    opt.init(trainable.trainable_parameters())
    for name, value in opt_state:  # set leaf by leaf: the state tree also holds empty containers
        *path, leaf = name.split(".")
        node = opt.state
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return TrainState(**raw)


def train(base: LoadedModel, bundle: Bundle, train_seqs: np.ndarray | list[np.ndarray], cfg: TrainConfig,
          out: str | Path, *,
          resume: bool = False, evaluate: Callable[[Bundle], dict] | None = None,
          metadata: dict | None = None, on_step: Callable[[TrainState, dict], None] | None = None) -> TrainState:
    """Train `bundle.predictor` on token sequences (n, seq_len), or a list of 1-D sequences of mixed lengths (batch
    size 1); the bundle is written to `out` at every checkpoint (usable at any time), the resumable state under
    `out/checkpoint/`."""
    out = Path(out)
    ragged = isinstance(train_seqs, list)  # sequences of mixed lengths, one per step
    if len(train_seqs) == 0 or (not ragged and train_seqs.ndim != 2):
        raise KVPredError("no training sequences")
    if ragged:
        shortest = min(len(x) for x in train_seqs)
        if cfg.batch_size != 1:
            raise KVPredError("sequences of mixed lengths train at batch_size 1", "batch_size")
        if shortest <= cfg.true_kv_tail + cfg.true_kv_head:
            raise KVPredError(f"true_kv_tail {cfg.true_kv_tail} and true_kv_head {cfg.true_kv_head} do not fit "
                              f"the shortest training sequence ({shortest} tokens)", "true_kv_tail", "true_kv_head")
    if not ragged and train_seqs.shape[1] != cfg.seq_len:
        raise ValueError(f"training sequences have {train_seqs.shape[1]} tokens, the config's seq_len is {cfg.seq_len}")
    if cfg.lr is None:
        cfg = replace(cfg, lr=DEFAULT_LR[bundle.config.predictor_input])
    model = base.model
    model.freeze()
    predictor = bundle.predictor
    lora = cfg.aux_lora_rank > 0
    if lora != bool(bundle.config.aux_lora):
        raise ValueError("aux_lora_rank needs a bundle made with enable_aux_lora (and only then)")
    bundle.aux.freeze()
    if lora:
        bundle.aux.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    backend = for_device()  # the default device's: training runs where MLX runs (the GPU where there is one)
    backend.prepare(model)
    backend.prepare(bundle.aux)
    trainable = Trainable(predictor, bundle.aux if lora else None)
    l1_weight = cfg.l1_weight if cfg.l1_weight is not None else 1.0 / len(model.layers)
    opt = optim.AdamW(learning_rate=cfg.lr, betas=[0.9, 0.95], weight_decay=cfg.weight_decay)
    state = TrainState()
    if resume:
        state = _load_checkpoint(out, trainable, opt, cfg)
    elif cfg.ridge_sequences:
        rng = np.random.default_rng(cfg.seed)
        pick = [train_seqs[i] for i in rng.permutation(len(train_seqs))[:cfg.ridge_sequences]]
        ridge_init(bundle, model, pick, lam=cfg.ridge_lambda, progress=(
            lambda: on_step(state, {"phase": "ridge", "total": len(pick)})) if on_step else None)
        state.ridge_done = True

    skip = shared_base_layers(bundle, model)  # e.g. lp8: base layers 0-7 are the aux's own, computed once

    def loss_fn(tokens, inputs):
        with backend.training():  # every op records an MLX graph for autodiff
            return step_loss(bundle, model, tokens, inputs, cfg=cfg, l1_weight=l1_weight, skip=skip)

    loss_and_grad = nn.value_and_grad(trainable, loss_fn)
    last_good = state.step
    while state.step < cfg.steps:
        tic = time.perf_counter()
        idx = batch_indices(state.step, len(train_seqs), cfg.batch_size, cfg.seed)
        tokens = mx.array(train_seqs[idx[0]])[None] if ragged else mx.array(train_seqs[idx])
        inputs = step_inputs(bundle, model, tokens, skip=skip)
        mx.eval(inputs)
        opt.learning_rate = lr_at(state.step, cfg)
        loss, grads = loss_and_grad(tokens, inputs)
        opt.update(trainable, grads)
        mx.eval(loss, trainable.trainable_parameters(), opt.state)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise KVPredError(f"non-finite loss at step {state.step + 1}; stopped, the last good checkpoint "
                              f"(step {last_good}) is kept in {out / CHECKPOINT_DIR}")
        dt = time.perf_counter() - tic
        state.elapsed += dt
        state.step += 1
        row = {"step": state.step, "loss": loss_value, "lr": opt.learning_rate.item() if isinstance(
            opt.learning_rate, mx.array) else opt.learning_rate, "tokens": tokens.size, "tok_s": tokens.size / dt}
        state.history.append(row)
        if evaluate and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
            state.evals.append({"step": state.step, **evaluate(bundle)})
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            finish_bundle(bundle, base, cfg, state, metadata)
            save_bundle(out, bundle, base=base)
            _save_checkpoint(out, trainable, opt, state, cfg)
            last_good = state.step
        if on_step:
            on_step(state, row)
    return state


def finish_bundle(bundle: Bundle, base: LoadedModel, cfg: TrainConfig, state: TrainState, metadata: dict | None) -> None:
    """Record how the predictor was made in the bundle config (it is trained once a step has run)."""
    bundle.config.trained = state.step > 0
    bundle.config.training = {
        **(metadata or {}), "config": asdict(cfg), "steps_done": state.step, "seconds": round(state.elapsed, 1),
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "evals": state.evals,
    }
