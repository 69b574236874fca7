"""The pure-MLX backend: MLX and mlx-lm as they are, nothing of our own. What Apple silicon runs (Metal, or the CPU
with Accelerate), and the reference every other backend must agree with."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import mlx.core as mx
import mlx.nn as nn

from . import STOCK_CLASS, gemm_row


class MLXBackend:
    name = "mlx"

    def prepare(self, model: nn.Module) -> None:
        """mlx-lm's own classes for every module (undoes another backend's prepare)."""
        for _, module in model.named_modules():
            stock = getattr(type(module), STOCK_CLASS, None)
            if stock is not None:
                module.__class__ = stock

    def run_rows(self, model: nn.Module, caches: Sequence[Any], **_) -> None:
        return None

    def attention_scores(self, *args, **kwargs) -> None:
        return None

    def append_kv(self, layers: Sequence[nn.Module], caches: Sequence[Any], keys: Sequence[mx.array],
                  values: Sequence[mx.array]) -> list[bool]:
        return [False] * len(layers)

    def predict_kv(self, *args, **kwargs) -> bool:
        return False

    def decoder(self, model: nn.Module) -> nn.Module:
        return model

    def training(self) -> ContextManager[None]:
        return nullcontext()

    def loss_ops(self) -> tuple[Callable, Callable]:
        return mx.exp, mx.logsumexp

    def wants_quantized(self) -> bool:
        return False

    def keep_quantized(self, model: nn.Module, weights: dict[str, tuple]) -> None:
        raise NotImplementedError("the MLX backend reads only MLX's own weights")

    def describe(self, *, gemm_gflops: float | None = None) -> dict[str, tuple[str, str]]:
        rows = {"backend": ("mlx: MLX and mlx-lm only (what Apple silicon runs)", "")}
        if gemm_gflops is not None:
            rows["fp32 GEMM"] = gemm_row(gemm_gflops)
        return rows
