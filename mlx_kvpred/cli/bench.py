"""kvpred-mlx bench: TTFT, TPOT and memory per mode and length; --conversation, --profile, --server."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import KVPredError
from .common import EXACT_HEAD, EXACT_KEEP, KEEP, app, parse_int_list, read_prompt


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
                                                   "rows, kvp's exact tail and short aux pass in MLX, not C), specprefill, "
                                                   "kvp@F (kvp recomputing the fraction F: --exact-keep per mode), "
                                                   "specprefill@F (keeping F). Default "
                                                   "base,kvp,aux,mlx-lm; with --server base,kvp (a server runs base, "
                                                   "kvp, auto)."),
    prompt_file: Optional[str] = typer.Option(None, help="Real text for the prompts (default: random tokens)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write all rows + environment here."),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="PNG: TTFT vs length; kvp speedup vs analytical."),
    exact_tail: Optional[int] = typer.Option(None, help="kvp: the base computes the last N prompt tokens itself "
                                                        "(default 32)."),
    exact_head: Optional[int] = EXACT_HEAD,
    exact_keep: Optional[float] = EXACT_KEEP,
    keep: Optional[float] = KEEP,
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
    soak: Optional[int] = typer.Option(None, help="With --server: instead, N requests from 8 clients (streamed and "
                                                  "not, 10% abandoned mid-stream, 10% malformed), checked for no 5xx, "
                                                  "no lost request, greedy answers equal to the first ones (a fresh "
                                                  "server's) and RSS growth under 5%. Exit 1 if a check fails."),
    api_key: Optional[str] = typer.Option(None, help="With --server: the server's --api-key."),
):
    """Time TTFT, TPOT, memory per mode and prompt length, with analytical FLOPs and speedups."""
    from rich.progress import Progress

    from ..bench.eval_harness import write_json
    from ..bench.run import plot, print_table, run_bench, untrained_lp_bundle
    from ..pipeline import DEFAULT_EXACT_TAIL, load_pipeline

    lengths = parse_int_list(prompt_lengths, "--prompt-lengths")
    if batch_size != 1:
        raise KVPredError("--batch-size: only 1 is supported (KV prediction of a batch is not implemented yet)")
    if repeats < 1 or warmup < 0 or gen_tokens < 2:
        raise KVPredError("--repeats must be >= 1, --warmup >= 0, --gen-tokens >= 2")
    pipe = load_pipeline(model, kvp=False if aux_layers_keep else kvp, device=device, allow_untrained=allow_untrained,
                         exact_head=exact_head, keep=keep, exact_keep=exact_keep)
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
        from ..bench.profile import print_profile, profile_models

        with Progress(transient=True) as progress:
            task = progress.add_task("profile", total=len(lengths) * (2 if pipe.bundle else 1))
            result = profile_models(pipe, lengths=lengths, progress=lambda: progress.advance(task))
        print_profile(result)
        if json_out:
            write_json(result, json_out)
        return
    if soak is not None:
        if not server or soak < 1:
            raise KVPredError("--soak N (>= 1) needs --server URL")
        return bench_soak(pipe, server, requests=soak, doc_tokens=doc_tokens, api_key=api_key, json_out=json_out)
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
    core_fix = result["environment"]["blas_core_fix"]  # e.g. OPENBLAS_CORETYPE held below the CPU (docs/performance.md)
    if core_fix:
        print(f"bench: these times ran on BLAS kernels below this CPU's. {core_fix}", file=sys.stderr)
    if json_out:
        write_json(result, json_out)
    if plot_out:
        plot(result, plot_out)


def bench_soak(pipe, url: str, *, requests: int, doc_tokens: int, api_key: Optional[str],
               json_out: Optional[str]) -> None:
    from rich.progress import Progress

    from ..bench.conversation import heldout_documents
    from ..bench.eval_harness import write_json
    from ..bench.server_client import check_same_model, connect
    from ..bench.soak import print_soak, run_soak, soak_prompts

    with connect(url, api_key=api_key) as client:
        check_same_model(client, pipe)
        prompts = soak_prompts(heldout_documents(pipe, doc_tokens, 1, flag="--doc-tokens")[0])
        with Progress(transient=True) as progress:
            task = progress.add_task("soak", total=requests + len(prompts))
            result = run_soak(client, prompts, requests=requests, progress=lambda: progress.advance(task))
    print_soak(result)
    if json_out:
        write_json({"server": url, **result}, json_out)
    if not result["passed"]:
        raise typer.Exit(1)


def bench_server(pipe, url: str, *, lengths: list[int], modes: list[str], repeats: int, warmup: int, exact_tail: int,
                 doc_tokens: int, json_out: Optional[str]) -> None:
    from rich.progress import Progress

    from ..bench.conversation import heldout_documents
    from ..bench.eval_harness import write_json
    from ..bench.server_client import (
        check_same_model,
        compare_ttft,
        connect,
        conversation_over_http,
        print_server_comparison,
    )

    with connect(url) as client:
        check_same_model(client, pipe)
        document = heldout_documents(pipe, doc_tokens, 1, flag="--doc-tokens")[0]
        with Progress(transient=True) as progress:
            task = progress.add_task("server", total=len(lengths) * len(modes) * (repeats + warmup) + 3)
            rows = compare_ttft(client, pipe, lengths=lengths, modes=modes, repeats=repeats, warmup=warmup,
                                exact_tail=exact_tail, progress=lambda: progress.advance(task))
            turns = conversation_over_http(client, document, progress=lambda: progress.advance(task))
    print_server_comparison(url, rows, turns, repeats=repeats, doc_tokens=doc_tokens)
    if json_out:
        write_json({"server": url, "ttft": rows, "conversation": turns, "doc_tokens": doc_tokens}, json_out)


def bench_conversation(pipe, *, doc_tokens: int, docs: int, repeats: int, json_out: Optional[str]) -> None:
    from rich.progress import Progress

    from ..bench.conversation import (
        auto_on_short_prompts,
        heldout_documents,
        print_conversation,
        score_later_turn,
        time_conversation,
    )
    from ..bench.eval_harness import write_json

    if pipe.bundle is None:
        raise KVPredError("--conversation needs a KVP bundle (--kvp DIR)")
    texts = heldout_documents(pipe, doc_tokens, max(docs, 1))
    with Progress(transient=True) as progress:
        task = progress.add_task("conversation", total=repeats * 4 + docs)
        timing = time_conversation(pipe, texts[0], repeats=repeats, progress=lambda: progress.advance(task))
        quality = score_later_turn(pipe, texts[:docs], progress=lambda: progress.advance(task)) if docs else {}
        auto = auto_on_short_prompts(pipe)
    print_conversation(timing, quality, auto, doc_tokens=doc_tokens, repeats=repeats)
    if json_out:
        write_json({"timing": timing, "later_turn": quality, "auto_short": auto, "doc_tokens": doc_tokens}, json_out)
