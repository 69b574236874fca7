"""kvpred-mlx: KV Prediction for fast time to first token on MLX.

On Linux, importing this package does two process-wide things, before MLX loads (they cannot wait until later):
it loads a fast BLAS with RTLD_GLOBAL, so MLX's matmuls use it instead of the reference BLAS its wheel bundles,
behind a shim that sends one-row products to sgemv (KVPRED_BLAS=none skips both; backends/linux_cpu/blas.py); and it
lets glibc keep freed memory up to 1 GB for reuse (MLX's CPU allocator mallocs every op's output). On macOS it does
nothing. Import mlx_kvpred before mlx.
"""

import sys

if sys.platform.startswith("linux"):
    from .backends.linux_cpu import blas as _blas

    _blas.load_fast_blas()
    _blas.keep_freed_memory()

__version__ = "0.1.0"
