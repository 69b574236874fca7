"""kvpred-mlx train and chat-data: train a KVP bundle, and write the training chats the base answers itself."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Optional

import typer

from ..errors import KVPredError
from ..recipe import TrainSpec
from ..selfdata import DOCUMENT_LENGTHS
from ..train import TrainConfig
from .common import DEVICE, app, log_progress, parse_int_list


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
    tail_kl_weight: float = typer.Option(TrainConfig.tail_kl_weight, help="KL weight of the --true-kv-tail "
                                                                          "positions against the rest's (the tail "
                                                                          "is where inference reads logits: e.g. a "
                                                                          "fact chat's question and answer)."),
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
    chat_data: Optional[list[str]] = typer.Option(None, help=".jsonl shards (chat-data --documents or --facts) "
                                                             "whose records train whole: long chat prompts with "
                                                             "their answers; repeatable."),
    eval_every: int = typer.Option(TrainConfig.eval_every, help="Held-out eval every N steps."),
    eval_sequences: int = typer.Option(TrainSpec.eval_sequences, help="Held-out sequences per eval (256+64 tokens "
                                                                      "each)."),
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every, help="Checkpoint (and bundle) every N steps."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint with the same options (a fresh run where "
                                            "there is none yet: start long runs with it)."),
    seed: int = typer.Option(TrainConfig.seed),
    device: Optional[str] = DEVICE,
):
    """Train a KV predictor (closed-form init + distillation) and write a KVP bundle.

    With no aux flags this is the shipped bundle's recipe (base layers 0-11 as the aux)."""
    from ..recipe import train_recipe

    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, kl_weight=kl_weight,
                      ce_weight=ce_weight, true_kv_tail=true_kv_tail, tail_kl_weight=tail_kl_weight,
                      true_kv_head=true_kv_head,
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
    facts: bool = typer.Option(False, help="Fact chats instead: a training-split file cut to N tokens with 1-3 "
                                           "facts stated once in it, a question about one and the answer stating "
                                           "it (written from the fact; no sampling, fast). Trains retrieval."),
    doc_lengths: Optional[str] = typer.Option(None, help="--documents / --facts: document lengths in tokens, one "
                                                         "per shard in turn (default 256,512,1024,2048 / "
                                                         "256,512,1024)."),
    data: Optional[list[str]] = typer.Option(None, help="--documents / --facts: text sources; their training split "
                                                         "is used (default: the default training sources)."),
    seed: int = typer.Option(0),
    device: Optional[str] = DEVICE,
):
    """Training text the base writes itself: its chat answers to varied prompts, or (--documents) to questions
    about documents; or (--facts) documents with facts in them, questions and their answers. Resumes at the next
    shard."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..data import collect_files, default_sources, split_files
    from ..loading import default_device, load_model, load_tokenizer, set_device
    from ..selfdata import FACT_LENGTHS, generate_chat_data, generate_document_chats, generate_fact_chats

    max_tokens = max_tokens if max_tokens is not None else 64 if documents else 256
    if count < 1 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise KVPredError("--count and --max-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    if documents and facts:
        raise KVPredError("--documents and --facts: give one", "--documents", "--facts")
    default_lengths = FACT_LENGTHS if facts else DOCUMENT_LENGTHS
    lengths = parse_int_list(doc_lengths, "--doc-lengths") if doc_lengths else list(default_lengths)
    files = (split_files(collect_files(list(data) if data else default_sources())).train_files
             if documents or facts else None)
    device = set_device(device or default_device())
    # fact chats sample nothing: their tokenizer only, not the weights
    tokenizer = load_tokenizer(model, device=device) if facts else None
    base = None if facts else load_model(model, device=device)
    columns = [TextColumn("chat data"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("", total=count)
        logged = None if progress.console.is_terminal else log_progress("chat data", count)

        def advance(n: int) -> None:
            progress.advance(task, n)
            if logged:
                logged(n)

        common = dict(count=count, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      progress=advance)
        if facts:
            shards = generate_fact_chats(tokenizer, out, files=files, count=count, lengths=lengths, seed=seed,
                                         progress=advance)
        elif documents:
            shards = generate_document_chats(base, out, files=files, lengths=lengths, **common)
        else:
            shards = generate_chat_data(base, out, **common)
    print(f"wrote {count} conversations in {len(shards)} shards under {out}", file=sys.stderr)
