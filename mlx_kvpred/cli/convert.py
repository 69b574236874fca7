"""kvpred-mlx convert: CoreNet / PyTorch KV-prediction checkpoints into bundles (converters/)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .common import app, parse_int_list


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

    from ..loading import set_device

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
