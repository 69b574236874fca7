"""The optional C parts (Linux only): cblas_sgemm forwarding one-row products to sgemv (gemv_forward.c)
and the prefill kernels on all cores (cpu_kernels.c). Everything else is in pyproject.toml; without a C
compiler the install goes on without them (`doctor` says so)."""
import sys

from setuptools import Extension, setup

HERE = "mlx_kvpred/backends/linux_cpu"  # the Linux CPU backend: its C sources beside their ctypes bindings
PACKAGE = HERE.replace("/", ".")

gemv_forward = Extension(f"{PACKAGE}._gemv_forward", [f"{HERE}/gemv_forward.c"], libraries=["dl"], optional=True)
cpu_kernels = Extension(f"{PACKAGE}._cpu_kernels", [f"{HERE}/cpu_kernels.c", f"{HERE}/decode_step.c"],
                        depends=[f"{HERE}/kernels.h"], libraries=["dl", "pthread", "m"],
                        extra_compile_args=["-O3", "-fopenmp-simd"], optional=True)
setup(ext_modules=[gemv_forward, cpu_kernels] if sys.platform.startswith("linux") else [])
