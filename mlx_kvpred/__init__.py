"""kvpred-mlx: KV Prediction for fast time to first token on MLX."""

from . import blas as _blas

_blas.load_fast_blas()  # must run before the first `import mlx` in the process
_blas.keep_freed_memory()

__version__ = "0.1.0"
