"""Load an optimized BLAS into the process before MLX, on Linux.

MLX's Linux CPU wheel bundles a reference BLAS (~4 GFLOP/s fp32 GEMM). Loading OpenBLAS or MKL with
RTLD_GLOBAL *before* `import mlx` makes MLX's GEMM calls resolve to it (~40x faster on x86). Ahead of it goes
the gemv_forward shim (built from gemv_forward.c at install), which sends one-row products (decode) to sgemv.
This module must not import mlx at module level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import warnings
from dataclasses import dataclass

ENV_VAR = "KVPRED_BLAS"  # path to a BLAS shared library, or "none" to skip
FORWARD_ENV_VAR = "KVPRED_GEMV_FORWARD"  # "0": load the BLAS without the gemv_forward shim
_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
PYPI_PREFIX = "scipy_"  # scipy-openblas32 (PyPI, the OpenBLAS numpy and scipy ship) prefixes every symbol
FIX_HINT = ("pip install scipy-openblas32 (or apt-get install libopenblas0-pthread, or set "
            "KVPRED_BLAS=/path/to/libopenblas.so)")


@dataclass
class BlasStatus:
    path: str | None  # the library loaded, None if only MLX's bundled reference BLAS is there
    source: str  # "env", "pypi", "mkl", "system", "not-linux", "disabled", "none", "too-late"
    message: str = ""
    prefix: str = ""  # of the library's symbols ("scipy_" for scipy-openblas32)
    gemv_forward: bool = False  # the shim sends one-row products to sgemv
    gemv_forward_note: str = ""  # why it is on or off (doctor prints it)
    gemv_forward_fix: str = ""  # what to do when it is off and need not be


_status: BlasStatus | None = None
_shim: ctypes.CDLL | None = None
_sgemm = None  # the loaded BLAS's own cblas_sgemm (for numpy arrays: see sgemm)
_core_name: str | None = None  # the kernel set OpenBLAS picked for this CPU (openblas_get_corename)


def _pypi_candidates() -> list[str]:
    """scipy-openblas32's library, if installed (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas32")
    places = list(spec.submodule_search_locations or []) if spec else []
    return [f for p in places for f in sorted(glob.glob(os.path.join(p, "lib", "libscipy_openblas*.so*")))]


def _mkl_candidates() -> list[str]:
    prefixes = [p for p in (os.environ.get("CONDA_PREFIX"), sys.prefix) if p]
    return [f for p in prefixes for f in sorted(glob.glob(os.path.join(p, "lib", "libmkl_rt.so*")))]


def _system_candidates() -> list[str]:
    found = ctypes.util.find_library("openblas")  # uses ldconfig
    names = [found] if found else []
    return names + [p for p in _CANDIDATES if os.path.exists(p)]


def load_fast_blas() -> BlasStatus:
    """Load the fastest BLAS found with RTLD_GLOBAL; idempotent. Warns once when none is found."""
    global _status
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus(None, "not-linux", "Accelerate/Metal are used on macOS")
        return _status
    env = os.environ.get(ENV_VAR, "")
    if env.lower() == "none":
        _status = BlasStatus(None, "disabled", f"{ENV_VAR}=none")
        return _status
    if "mlx.core" in sys.modules:
        _status = BlasStatus(None, "too-late", "mlx was imported before mlx_kvpred; import mlx_kvpred first")
        warnings.warn(f"kvpred-mlx: {_status.message} to get a fast BLAS", stacklevel=2)
        return _status
    # The system's OpenBLAS where its kernels fit this CPU (measured faster here than PyPI's for this workload), else
    # PyPI's scipy-openblas32, newer, which knows newer CPUs (MLX reaches its prefixed symbols only through the shim),
    # else whatever there is
    pypi = [("pypi", p) for p in (_pypi_candidates() if shim_path() else [])]
    system = [("system", p) for p in _system_candidates()]
    tries = ([("env", env)] if env else []) + [("mkl", p) for p in _mkl_candidates()]
    tries += [("system-fitting", p) for _, p in system] + pypi + system
    errors = []
    for source, path in tries:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)  # loads: only now may the shim go ahead of it
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        prefix = PYPI_PREFIX if hasattr(lib, PYPI_PREFIX + "cblas_sgemm") else ""
        if source == "system-fitting":
            if pypi and core_check(_read_core_name(lib, prefix))[1]:
                continue  # generic kernels on this CPU: PyPI's OpenBLAS next
            source = "system"
        forward, note, fix = _gemv_forward(lib, path, prefix)
        if prefix and _shim is None:
            errors.append(f"{path}: its {prefix}cblas_sgemm reaches MLX only through the gemv_forward shim ({note})")
            continue
        _keep_sgemm(lib, prefix)
        _keep_core_name(lib, prefix)
        if _shim is None:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        _status = BlasStatus(path, source, prefix=prefix, gemv_forward=forward, gemv_forward_note=note,
                             gemv_forward_fix=fix)
        return _status
    msg = "only MLX's reference BLAS is available (fp32 matmul ~4 GFLOP/s); fix: " + FIX_HINT
    if errors:
        msg += " [failed: " + "; ".join(errors) + "]"
    _status = BlasStatus(None, "none", msg)
    warnings.warn("kvpred-mlx: " + msg, stacklevel=2)
    return _status


def shim_path() -> str | None:
    """The built gemv_forward shim next to this file, if the install compiled it."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_gemv_forward*.so")))
    return found[0] if found else None


def _gemv_forward(lib: ctypes.CDLL, blas_path: str, prefix: str) -> tuple[bool, str, str]:
    """Put the shim ahead of the BLAS at `blas_path` (loaded locally as `lib`, symbols with `prefix`) if it can be:
    (forwarding on, note, fix). A prefixed BLAS gets the shim with forwarding off under KVPRED_GEMV_FORWARD=0 (MLX
    reaches it through the shim alone)."""
    off = os.environ.get(FORWARD_ENV_VAR, "1") == "0"
    if off and not prefix:
        return False, f"off ({FORWARD_ENV_VAR}=0)", ""
    if not all(hasattr(lib, prefix + f) for f in ("cblas_sgemm", "cblas_sgemv")):  # what the shim forwards to
        return False, f"off: {blas_path} has no {prefix}cblas_sgemm/{prefix}cblas_sgemv", ""
    path = shim_path()
    if path is None:
        return False, "off: the shim was not built (decode runs ~1.5x slower)", \
            "install a C compiler (apt-get install gcc), then reinstall kvpred-mlx"
    if not _load_shim(path, blas_path, prefix):
        return False, f"off: {path} did not load", "reinstall kvpred-mlx"
    if off:
        _shim.gemv_forward_enable(0)
        return False, f"off ({FORWARD_ENV_VAR}=0)", ""
    return True, "on: one-row matmuls (decode) go to sgemv", ""


def _load_shim(path: str, blas_path: str, prefix: str) -> bool:
    """The shim at `path` first in the global symbol order, then the BLAS at `blas_path` behind it."""
    global _shim
    try:
        shim = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    if shim.gemv_forward_init(blas_path.encode(), prefix.encode()) != 0:
        return False
    shim.gemv_forward_count.restype = ctypes.c_long
    _shim = shim
    return True


def set_gemv_forward(enabled: bool) -> bool:
    """Turn the shim's forwarding on or off in this process (to time both); returns the previous setting.
    The switch is read when an op runs (mx.synchronize() first). Without the shim: RuntimeError if asked to."""
    if _shim is None:
        if enabled:
            raise RuntimeError("the gemv_forward shim is not loaded (load_fast_blas().gemv_forward is False)")
        return False
    return bool(_shim.gemv_forward_enable(int(enabled)))


def _keep_sgemm(lib: ctypes.CDLL, prefix: str) -> None:
    global _sgemm
    fn = getattr(lib, prefix + "cblas_sgemm", None)
    if fn is not None:
        c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        fn.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
        fn.restype = None
    _sgemm = fn


def set_threads(n: int) -> int:
    """Run the loaded OpenBLAS (and so the C kernels) on `n` threads; returns the previous count. Needs an OpenBLAS
    (its openblas_set_num_threads, with the library's symbol prefix)."""
    st = load_fast_blas()
    lib = ctypes.CDLL(st.path)  # the library already loaded: the same handle
    get, put = (getattr(lib, st.prefix + name) for name in ("openblas_get_num_threads", "openblas_set_num_threads"))
    was = int(get())
    put(n)
    return was


def has_sgemm() -> bool:
    """A BLAS was loaded whose sgemm `sgemm` can call."""
    return _sgemm is not None


def sgemm(a, b, *, transpose_b: bool = False):
    """a @ b (a @ b.T with `transpose_b`) of 2-D float32 numpy arrays whose rows are contiguous, by the BLAS MLX
    uses: numpy's own bundled BLAS keeps a second thread pool, which spins against this one's (docs/performance.md).
    Needs has_sgemm()."""
    import numpy as np

    m, k = a.shape
    n = b.shape[0] if transpose_b else b.shape[1]
    if a.dtype != np.float32 or b.dtype != np.float32 or a.strides[1] != 4 or b.strides[1] != 4:
        raise ValueError("sgemm takes float32 arrays with contiguous rows")
    out = np.empty((m, n), np.float32)
    row_major, no_trans, trans = 101, 111, 112
    _sgemm(row_major, no_trans, trans if transpose_b else no_trans, m, n, k, 1.0, a.ctypes.data, a.strides[0] // 4,
           b.ctypes.data, b.strides[0] // 4, 0.0, out.ctypes.data, n)
    return out


def gemv_forward_count() -> int:
    """One-row / one-column products the shim has sent to sgemv in this process (0 without the shim)."""
    return int(_shim.gemv_forward_count()) if _shim is not None else 0


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """glibc: serve allocations up to `limit` bytes from the heap and keep freed memory there.

    MLX's CPU allocator mallocs every op's output; glibc maps blocks over 32 MB fresh from the OS each
    time, so each op on a (256, 49152) logits array paid ~12k page faults (docs/performance.md).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, 2 * limit))
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep its defaults
        return False


# OpenBLAS kernel sets by the widest vector instructions they use; a core below the CPU's runs generic code.
_CORE_ISA = {"prescott": "sse3", "core2": "sse3", "penryn": "sse3", "dunnington": "sse3", "nehalem": "sse3",
             "atom": "sse3", "barcelona": "sse3", "bobcat": "sse3", "bulldozer": "avx", "piledriver": "avx",
             "steamroller": "avx", "excavator": "avx", "sandybridge": "avx", "haswell": "avx2", "zen": "avx2",
             "skylakex": "avx512", "cooperlake": "avx512", "sapphirerapids": "avx512"}
_ISA_ORDER = ("sse3", "avx", "avx2", "avx512")
_CORE_FOR_ISA = {"avx": "Sandybridge", "avx2": "Haswell", "avx512": "SkylakeX"}


def _keep_core_name(lib: ctypes.CDLL, prefix: str) -> None:
    global _core_name
    _core_name = _read_core_name(lib, prefix)


def _read_core_name(lib: ctypes.CDLL, prefix: str) -> str | None:
    """The kernel set an OpenBLAS picked for this CPU (None for other BLAS libraries)."""
    fn = getattr(lib, prefix + "openblas_get_corename", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode(errors="replace").strip()


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The widest x86 vector instructions this CPU has (sse3, avx, avx2, avx512), from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return "sse3"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "avx" if "avx" in flags else "sse3"


def core_check(core: str | None = None, isa: str | None = None, *, newest: bool | None = None,
               env_core: str | None = None) -> tuple[str, str]:
    """(the kernel set the loaded OpenBLAS picked, and the fix where it is below what this CPU can run, else "").
    An OpenBLAS older than the CPU falls back to generic kernels (e.g. Debian 12's 0.3.21 picks "Prescott" on
    some AVX-512 Xeons: its GEMM then runs ~4x slower). `newest`: the loaded library is PyPI's scipy-openblas32
    already (default: as loaded). `env_core`: OPENBLAS_CORETYPE (default: as set), which every OpenBLAS obeys: a
    machine's environment can hold it below the CPU (docs/performance.md)."""
    core = core if core is not None else _core_name
    if not core:
        return "", ""
    isa = isa or cpu_isa()
    core_isa = _CORE_ISA.get(core.lower())
    if core_isa is None or _ISA_ORDER.index(core_isa) >= _ISA_ORDER.index(isa):
        return core, ""
    setting = f"set OPENBLAS_CORETYPE={_CORE_FOR_ISA[isa]}"
    env_core = os.environ.get("OPENBLAS_CORETYPE", "") if env_core is None else env_core
    if env_core.lower() == core.lower():
        return core, (f"OPENBLAS_CORETYPE={env_core} in the environment holds OpenBLAS to its {core} kernels on a CPU "
                      f"with {isa.upper()}: unset it (or {setting})")
    if newest is None:
        newest = _status is not None and _status.prefix == PYPI_PREFIX
    fix = setting if newest else f"pip install scipy-openblas32 (a newer OpenBLAS, used when installed), or {setting}"
    return core, f"OpenBLAS runs its {core} kernels on a CPU with {isa.upper()}: {fix}"
