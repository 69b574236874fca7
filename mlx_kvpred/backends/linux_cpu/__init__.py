"""The Linux CPU backend (backend.py): BLAS loading (blas.py, with the gemv_forward.c shim), the C kernels and their
ctypes bindings (cpu_kernels.c, decode_step.c, cpu_kernels.py), fast CPU ops (cpu_ops.py) and the compiled and C
decode steps (decode.py). Nothing here imports mlx at import time: blas.py must run before MLX loads."""
