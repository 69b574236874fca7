"""The optional C part: cblas_sgemm forwarding one-row products to sgemv (mlx_kvpred/gemv_forward.c, Linux only).
Everything else is in pyproject.toml; without a C compiler the install goes on without it (`doctor` says so)."""
import sys

from setuptools import Extension, setup

gemv_forward = Extension("mlx_kvpred._gemv_forward", ["mlx_kvpred/gemv_forward.c"], libraries=["dl"], optional=True)
setup(ext_modules=[gemv_forward] if sys.platform.startswith("linux") else [])
