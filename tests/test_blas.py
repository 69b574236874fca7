"""The gemv_forward shim: one-row / one-column matmuls go to sgemv, with the products sgemm gives."""

import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_kvpred.backends.linux_cpu import blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim is built on Linux only")


def products() -> list[tuple[mx.array, mx.array]]:
    """(A, B) pairs with one row or one column, in every layout MLX hands to cblas_sgemm."""
    pairs = []
    for m, n, k in [(1, 1536, 576), (1, 7, 3), (576, 1, 64), (5, 1, 9), (1, 1, 8), (3, 4, 5)]:
        a, b = mx.random.normal((m, k), key=mx.random.key(m + n)), mx.random.normal((k, n), key=mx.random.key(k))
        for A in (a, mx.contiguous(a.T).T):  # row-major and transposed storage
            for B in (b, mx.contiguous(b.T).T):
                pairs.append((A, B))
        leading = mx.random.normal((m, k + 7), key=mx.random.key(k))[:, :k]  # a slice: the leading dimension is not k
        pairs.append((leading, b))
    batched = mx.random.normal((4, 1, 64), key=mx.random.key(1)), mx.random.normal((4, 64, 32))  # one-row products
    pairs.append(batched)
    return pairs


def test_one_row_products_go_to_sgemv_and_equal_sgemm():
    status = blas.load_fast_blas()
    if status.path is None:
        pytest.skip("no system BLAS here: MLX's reference BLAS has nothing to forward to")
    assert blas.shim_path() is not None, "gemv_forward.c was not compiled at install (needs a C compiler)"
    assert status.gemv_forward and status.gemv_forward_note.startswith("on") and not status.gemv_forward_fix
    pairs = products()
    was = blas.set_gemv_forward(True)
    try:
        start = blas.gemv_forward_count()
        forwarded = [a @ b for a, b in pairs]
        mx.eval(forwarded)
        assert blas.gemv_forward_count() - start >= 20  # every one-row and one-column case of products()
        blas.set_gemv_forward(False)
        plain = [a @ b for a, b in pairs]
        mx.eval(plain)
    finally:
        blas.set_gemv_forward(was)
    for (a, b), f, p in zip(pairs, forwarded, plain):
        exact = np.array(a, np.float64) @ np.array(b, np.float64)
        assert np.abs(np.array(f) - exact).max() <= 1e-4 * max(1.0, np.abs(exact).max())
        assert np.abs(np.array(f) - np.array(p)).max() <= 1e-4 * max(1.0, np.abs(exact).max())


@pytest.mark.skipif(not blas.has_sgemm(), reason="no BLAS loaded by blas.py (not Linux, or none installed)")
def test_sgemm_on_numpy_arrays_equals_numpy():
    """blas.sgemm (numpy_causal_attention's products) gives numpy's products, with b transposed or not, on arrays
    whose rows are strided (a cache's first S rows of a longer buffer), and refuses other layouts."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 64), dtype=np.float32)
    buffer = rng.standard_normal((300, 80), dtype=np.float32)
    keys = buffer[:200, :64]  # rows 320 bytes apart
    assert np.allclose(blas.sgemm(a, keys, transpose_b=True), a @ keys.T, atol=1e-4)
    assert np.allclose(blas.sgemm(a @ keys.T, keys), (a @ keys.T) @ keys, atol=1e-3)
    with pytest.raises(ValueError, match="float32"):
        blas.sgemm(a.astype(np.float64), keys, transpose_b=True)
    with pytest.raises(ValueError, match="contiguous rows"):
        blas.sgemm(a, keys[:, ::2], transpose_b=True)


CHECK = """
import json, mlx_kvpred
import mlx.core as mx, numpy as np
from mlx_kvpred.backends.linux_cpu import blas, cpu_kernels
st = blas.load_fast_blas()
a, b = mx.random.normal((1, 300), key=mx.random.key(1)), mx.random.normal((300, 200), key=mx.random.key(2))
c, d = mx.random.normal((64, 300), key=mx.random.key(3)), mx.random.normal((300, 96), key=mx.random.key(4))
before = blas.gemv_forward_count()
y, z = a @ b, c @ d
mx.eval(y, z)
err = max(float(np.abs(np.array(y) - np.array(a, np.float64) @ np.array(b, np.float64)).max()),
          float(np.abs(np.array(z) - np.array(c, np.float64) @ np.array(d, np.float64)).max()))
print(json.dumps({"source": st.source, "path": st.path, "prefix": st.prefix, "forwarded": blas.gemv_forward_count()
                  - before, "err": err, "core": blas.core_check()[0], "kernels": cpu_kernels.available()}))
"""


def loaded(env: dict) -> dict:
    import json
    import os
    import subprocess

    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_blas_that_knows_the_cpu():
    """The system OpenBLAS is taken where its kernels fit this CPU; where they do not (an OpenBLAS older than the
    CPU: simulated by OPENBLAS_CORETYPE=Prescott), PyPI's scipy-openblas32 (every symbol prefixed scipy_), which
    MLX's matmuls reach through the shim (one-row ones as sgemv), as do the C kernels. KVPRED_BLAS picks a library."""
    pypi = blas._pypi_candidates()
    if not pypi or blas.shim_path() is None:
        pytest.skip("scipy-openblas32 is not installed or the shim was not built")
    chosen = loaded({})
    assert chosen["err"] < 1e-3 and chosen["forwarded"] >= 1 and chosen["kernels"]
    if chosen["source"] == "system":
        assert not blas.core_check(chosen["core"])[1]  # its kernels fit this CPU
    if blas.cpu_isa() in ("avx2", "avx512"):
        generic = loaded({"OPENBLAS_CORETYPE": "Prescott"})  # both read it: the system one, generic, is passed over
        assert generic["source"] == "pypi" and generic["prefix"] == "scipy_" and "scipy_openblas" in generic["path"]
        assert generic["forwarded"] >= 1 and generic["err"] < 1e-3 and generic["kernels"] and generic["core"]
    forced = loaded({"KVPRED_BLAS": pypi[0]})
    assert forced["source"] == "env" and forced["prefix"] == "scipy_" and forced["err"] < 1e-3
    no_forward = loaded({"KVPRED_BLAS": pypi[0], "KVPRED_GEMV_FORWARD": "0"})  # MLX reaches it, sgemm only
    assert no_forward["forwarded"] == 0 and no_forward["err"] < 1e-3
