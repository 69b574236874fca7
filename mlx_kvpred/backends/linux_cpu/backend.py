"""The Linux CPU backend: the method's steps in C on all cores where the install built the kernels, fast exp-based
MLX ops elsewhere, and a compiled decode step. Each part has its own switch (KVPRED_*=0 turns it off; doctor shows
them); with every switch off it runs what the MLX backend runs, plus the BLAS loaded before MLX (blas.py)."""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Sequence

import mlx.core as mx
import mlx.nn as nn

from ...switch import Switch
from .. import gemm_row
from . import blas, cpu_kernels, cpu_ops, decode

# "0": models keep mlx-lm's own attention, SwiGLU, GELU and RoPE code
FAST_CPU_OPS = Switch("KVPRED_FAST_CPU_OPS", lambda: True,
                      "on: attention, SwiGLU, GELU and RoPE of the models kvpred-mlx loads", "off", "")


class LinuxCPUBackend:
    name = "linux_cpu"

    def prepare(self, model: nn.Module) -> None:
        if FAST_CPU_OPS.enabled():
            cpu_ops.prepare_model(model)
        else:
            cpu_ops.restore_model(model)

    def run_rows(self, model: nn.Module, caches: Sequence[Any], *, tokens: mx.array | None = None,
                 stream: mx.array | None = None, first_layer: int = 0, stop_layer: int | None = None,
                 positions: mx.array | None = None, rotate_at: mx.array | None = None,
                 queries: list | None = None) -> mx.array | None:
        return decode.prefill_rows_in_c(model, caches, tokens=tokens, stream=stream, first_layer=first_layer,
                                        stop_layer=stop_layer, positions=positions, rotate_at=rotate_at,
                                        queries=queries)

    def attention_scores(self, layers: Sequence[nn.Module], queries: Sequence[mx.array], keys: Sequence[mx.array],
                         *, end: int, pool: int, windows: Sequence[int | None] | None = None) -> mx.array | None:
        return cpu_ops.attention_scores_in_c(layers, queries, keys, end=end, pool=pool, windows=windows)

    def append_kv(self, layers: Sequence[nn.Module], caches: Sequence[Any], keys: Sequence[mx.array],
                  values: Sequence[mx.array]) -> list[bool]:
        return cpu_ops.append_kv_in_c(layers, caches, keys, values)

    def predict_kv(self, predictor: nn.Module, norm: nn.Module, stream: mx.array, prev: mx.array | None,
                   layers: Sequence[nn.Module], caches: Sequence[Any], *, room: int = 0) -> bool:
        return cpu_ops.predict_kv_in_c(predictor, norm, stream, prev, layers, caches, room=room)

    def decoder(self, model: nn.Module) -> Any:
        return decode.compiled_decoder(model)

    def training(self) -> ContextManager[None]:
        return cpu_ops.mlx_ops()  # C and numpy ops evaluate their inputs mid-graph: autodiff needs MLX's

    def loss_ops(self) -> tuple[Callable, Callable]:
        return cpu_ops.fast_exp, cpu_ops.fast_logsumexp

    def wants_quantized(self) -> bool:
        return decode.keeps_quantized()

    def keep_quantized(self, model: nn.Module, weights: dict[str, tuple]) -> None:
        decode.keep_quantized(model, weights)

    def describe(self, *, gemm_gflops: float | None = None) -> dict[str, tuple[str, str]]:
        st = blas.load_fast_blas()
        rows = {"backend": ("linux_cpu: C kernels, fast CPU ops and a compiled decode step over MLX", "")}
        if st.path:
            core, fix = blas.core_check()
            rows["blas"] = f"{st.path} ({st.source}{f', core {core}' if core else ''})", fix
            rows["gemv forward"] = st.gemv_forward_note, st.gemv_forward_fix
        else:
            rows["blas"] = "MLX's bundled reference BLAS only", blas.FIX_HINT if st.source == "none" else st.message
        rows["fast cpu ops"] = FAST_CPU_OPS.note(), ""
        rows["C kernels"] = cpu_kernels.C_KERNELS.note(), ""
        rows["prefill attn"] = cpu_ops.prefill_attention_note(), ""
        rows["decode"] = decode.compiled_decode_note(), ""
        rows["short prompts"] = decode.C_ROWS.note(), ""
        if gemm_gflops is not None:
            slow = gemm_gflops < 50
            rows["fp32 GEMM"] = gemm_row(gemm_gflops, "this is reference-BLAS speed: " + blas.FIX_HINT if slow else "")
        return rows
