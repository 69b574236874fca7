"""The seam between the method and the machine.

KV prediction itself (pipeline, session, cache writing, predictor, training) is written in MLX and mlx-lm. A
backend may run a few of its steps faster on one kind of machine; the method asks it through `Backend`, and every
method answers "not done here" (None / False) unless the backend has a faster way, in which case the caller's MLX
code runs instead. Two backends:
- `MLXBackend` (pure_mlx.py): pure MLX and mlx-lm, nothing else. What Apple silicon runs, and the reference.
- `LinuxCPUBackend` (linux_cpu/): C kernels, a C decode step, fast exp-based ops and a BLAS loaded before MLX, for
  x86/ARM Linux CPUs.

`for_device` picks one: the Linux CPU backend on Linux when the device is the CPU, else MLX; `KVPRED_BACKEND=mlx`
(or `linux_cpu`) overrides. This module imports no backend until one is asked for, and never mlx at import (the
Linux backend's BLAS must load before MLX does).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, ContextManager, Protocol, Sequence

from ..errors import KVPredError

ENV_VAR = "KVPRED_BACKEND"  # "mlx" or "linux_cpu": overrides the choice by device
NAMES = ("mlx", "linux_cpu")
STOCK_CLASS = "_kvpred_stock"  # on a class a backend swapped in (prepare): the mlx-lm class it stands for


class Backend(Protocol):
    """What the method asks of a backend. Each step returns None/False where the backend leaves it to MLX."""

    name: str

    def prepare(self, model: Any) -> None:
        """Make `model` (a model this project loaded or built) run on this backend: its own modules only, never
        another library's module-level functions. Idempotent; a model prepared by another backend is taken over."""

    def run_rows(self, model: Any, caches: Sequence[Any], *, tokens: Any = None, stream: Any = None,
                 first_layer: int = 0, stop_layer: int | None = None, positions: Any = None, rotate_at: Any = None,
                 queries: list | None = None) -> Any:
        """A prompt's last rows (`tokens` (1, R) or the residual `stream` (1, R, dim) entering block `first_layer`)
        through blocks first_layer..stop_layer - 1 with `caches` extended: the last row's logits (1, vocab), or with
        an earlier `stop_layer` the stream leaving it (1, R, dim); each block's rotated queries (1, n_q, R, D)
        appended to `queries` if given. With `positions` (R sorted positions below the caches' offset, caches that
        hold every position): the rows are at those positions, their K/V replace the cached ones there and each
        attends to the positions up to its own (positions.recompute_at); returns the stream leaving the blocks.
        With `rotate_at` (R positions): the rows are appended as usual but RoPE rotates them there (SpecPrefill's
        kept rows, positions.rotated_at). None: not done, nothing changed."""

    def attention_scores(self, layers: Sequence[Any], queries: Sequence[Any], keys: Sequence[Any], *, end: int,
                         pool: int, windows: Sequence[int | None] | None = None) -> Any:
        """importance.attention_scores (the same arguments, `exp` aside): the importance (end,) of a prompt's
        positions by the attention its last rows pay them. None: not done."""

    def append_kv(self, layers: Sequence[Any], caches: Sequence[Any], keys: Sequence[Any],
                  values: Sequence[Any]) -> list[bool]:
        """Append pre-norm pre-RoPE keys and values (1, L, n_kv * D) to base `layers`' caches as the base would have
        written them; per layer, whether it was done (the caller appends the rest)."""

    def predict_kv(self, predictor: Any, norm: Any, stream: Any, prev: Any, layers: Sequence[Any],
                   caches: Sequence[Any], *, room: int = 0) -> bool:
        """The predictor's K/V of the positions of the aux's residual `stream` (before its final `norm`; `prev` the
        normed stream before them) appended to the caches of the base `layers` its transforms learned, leaving room
        for `room` positions more. False: not done, nothing changed."""

    def decoder(self, model: Any) -> Any:
        """What decodes one token at a time for `model` in mlx-lm's generate_step (the model itself, or a faster
        step with the same call)."""

    def training(self) -> ContextManager[None]:
        """Inside: every op records an MLX graph autodiff can differentiate (what training runs in)."""

    def loss_ops(self) -> tuple[Callable, Callable]:
        """(exp, logsumexp) for training losses."""

    def wants_quantized(self) -> bool:
        """Whether a GGUF's quantized weights are worth keeping beside the float32 ones (keep_quantized)."""

    def keep_quantized(self, model: Any, weights: dict[str, tuple]) -> None:
        """Keep a GGUF's quantized weights (name -> (weight, scales, biases, bits)) for the decode step."""

    def describe(self, *, gemm_gflops: float | None = None) -> dict[str, tuple[str, str]]:
        """What runs where, as doctor's rows: name -> (what, the fix where something is wrong, else ""); with
        `gemm_gflops` (measured) a row for it. Its values key the speed probe's cache (switch states included)."""


def gemm_row(gflops: float, fix: str = "") -> tuple[str, str]:
    """doctor's row of a measured fp32 GEMM rate (flops.measure_gemm_gflops)."""
    return f"{gflops:.1f} GFLOP/s (1024x1024, median of 5)", fix


def default_name(device: str) -> str:
    """The backend `for_device` picks: KVPRED_BACKEND, else linux_cpu on a Linux CPU, else mlx."""
    name = os.environ.get(ENV_VAR, "")
    if name:
        if name not in NAMES:
            raise KVPredError(f"{ENV_VAR} must be one of {', '.join(NAMES)}, got {name!r}")
        return name
    return "linux_cpu" if sys.platform.startswith("linux") and device == "cpu" else "mlx"


_made: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The backend called `name` (one instance per process)."""
    if name not in _made:
        if name == "mlx":
            from .pure_mlx import MLXBackend

            _made[name] = MLXBackend()
        elif name == "linux_cpu":
            from .linux_cpu.backend import LinuxCPUBackend

            _made[name] = LinuxCPUBackend()
        else:
            raise KVPredError(f"unknown backend {name!r} (one of {', '.join(NAMES)})")
    return _made[name]


def for_device(device: str | None = None) -> Backend:
    """The backend for `device` ("cpu" or "gpu"; None: MLX's default device)."""
    if device is None:
        import mlx.core as mx

        device = "cpu" if mx.default_device() == mx.cpu else "gpu"
    return get(default_name(device))
