"""The optional C parts (Linux only): cblas_sgemm forwarding one-row products to sgemv (mlx_kvpred/gemv_forward.c)
and the prefill kernels on all cores (mlx_kvpred/cpu_kernels.c). Everything else is in pyproject.toml; without a C
compiler the install goes on without them (`doctor` says so)."""
import sys

from setuptools import Extension, setup

gemv_forward = Extension("mlx_kvpred._gemv_forward", ["mlx_kvpred/gemv_forward.c"], libraries=["dl"], optional=True)
cpu_kernels = Extension("mlx_kvpred._cpu_kernels", ["mlx_kvpred/cpu_kernels.c", "mlx_kvpred/decode_step.c"],
                        depends=["mlx_kvpred/kernels.h"], libraries=["dl", "pthread", "m"],
                        extra_compile_args=["-O3", "-fopenmp-simd"], optional=True)
setup(ext_modules=[gemv_forward, cpu_kernels] if sys.platform.startswith("linux") else [])
