"""Who multiplies the ``cpu`` kernels' tiles: Intel MKL (from PyTorch's library) or OpenBLAS.

**float32.**  The tile GEMMs call a Fortran ``sgemm`` bound to :data:`SGEMM_SYMBOL`: MKL's
``sgemm_`` where PyTorch's ``libtorch_cpu.so`` is installed (it links MKL statically and
exports it), else SciPy's OpenBLAS ``sgemm`` (the BLAS Numba's ``np.dot`` calls).  Single
thread, on the kernels' tile shapes, MKL ran 1.1–1.6× OpenBLAS here (``docs/performance.md``),
and both accumulate in place (``beta = 1``).  ``DOTATTN_CPU_F32_GEMM=openblas`` forces
OpenBLAS.  The binding is made once per process, before the first float32 kernel loads:
the compiled kernels name the symbol, the linker resolves it — the same machine code
(and disk cache entry) serves both.

**bfloat16.**  bfloat16 tiles are multiplied with float32 accumulation (``vdpbf16ps`` of
``avx512_bf16``, or the AMX tile unit where the CPU has ``amx-bf16``) through MKL's
``cblas_gemm_bf16bf16f32``.  That path runs when all of these hold; otherwise bfloat16
inputs take the float32 path (converted once).  :func:`bf16_gemm` says which, and why:

* the CPU reports ``avx512bf16`` or ``amx-bf16`` (LLVM's view of CPUID);
* ``libtorch_cpu.so`` is found next to an installed ``torch`` and exports the function;
* ``DOTATTN_CPU_BF16`` is not ``off`` (set it to force the float32 fallback).

Nothing is downloaded or installed beyond torch: the library is opened by path (``torch``
is not imported) and its functions are handed to Numba's linker under names of our own.
MKL runs on the calling thread inside the kernels (``MKL_Set_Num_Threads_Local(1)`` bound
to :data:`THREADS_SYMBOL`; a no-op where MKL is absent): the kernels run their own threads.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from pathlib import Path

ENV_VAR = "DOTATTN_CPU_BF16"
AMX_ENV_VAR = "DOTATTN_CPU_AMX"
F32_ENV_VAR = "DOTATTN_CPU_F32_GEMM"
# float32 tile products on AMX as split bfloat16 products (_cpu_amx_f32, cpu.f32_split_route):
# "amx" (the score products and the backward's dP; default where AMX runs), "amx5" (also the
# backward's other three products and the forward's P·V) or "mkl" (MKL's float32 sgemm tiles);
# read on every call
F32_PRODUCTS_ENV_VAR = "DOTATTN_F32_PRODUCTS"
# Whether the split route takes all five backward products when the variable is unset ("amx"
# asks for the score products and dP only): yes since 1 Dec 07:50 — the kernel was 8.6 % faster
# at two threads; the whole call lost that to prange passes per call, now in the tasks or on
# the calling thread.  Whole backward, routes alternated, medians of 9 (07:34–07:37, load 1.4–1.9):
# dense H8 L4096 D64 258.3 → 237.7 ms, H4 D128 256.9 → 248.7, causal H8 D64 173.2 → 172.1
# (docs/performance-log.md, "float32 backward: the profile per section …")
F32_ALL_PRODUCTS_DEFAULT = True
# Names under which the kernels link the GEMMs (llvmlite's add_symbol).
GEMM_SYMBOL = "dotattn_cblas_gemm_bf16bf16f32"
SGEMM_SYMBOL = "dotattn_sgemm"
THREADS_SYMBOL = "dotattn_mkl_set_num_threads_local"

_OFF = ("off", "0", "false", "no", "fallback", "openblas")

_lock = threading.Lock()
_state: tuple[bool, str] | None = None  # bfloat16
_f32_state: tuple[bool, str] | None = None  # float32, fixed once bound
_mkl: tuple[object, str] | None = None  # (the CDLL or None, what / why not)
_no_threads = None  # keeps the no-op thread setter alive where MKL is absent
_threads_setter = None  # MKL_Set_Num_Threads_Local through ctypes (mkl_threads_here)
_amx_permission: tuple[bool, str] | None = None


@functools.lru_cache(maxsize=None)
def _cpu_features() -> frozenset[str]:
    """LLVM's view of CPUID, read once (≈ 1.5 ms a read: it was read on every bfloat16 call)."""
    import llvmlite.binding as ll

    return frozenset(f[1:] for f in ll.get_host_cpu_features().flatten().split(",") if f.startswith("+"))


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), "" where unknown: MKL
    runs its AVX2 code on CPUs that are not Intel's, whatever their instructions."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _torch_library() -> Path | None:
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib" / "libtorch_cpu.so"
    return path if path.exists() else None


def _open_mkl() -> tuple[object, str]:
    """``(library, its file name)`` with MKL's thread setter bound, or ``(None, why not)``.

    Opens torch's library once per process (≈ 0.3–0.5 s); where it is absent, the thread
    setter is bound to a no-op so that kernels naming it still link.  Call under ``_lock``.
    """
    global _mkl, _no_threads
    if _mkl is not None:
        return _mkl
    import llvmlite.binding as ll

    path = _torch_library()
    lib, why = None, "needs PyTorch's libtorch_cpu.so (its MKL); torch is not installed"
    if path is not None:
        try:
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
            threads = ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value
        except (OSError, AttributeError) as exc:
            lib, why = None, f"{path.name} has no MKL ({exc})"
        else:
            ll.add_symbol(THREADS_SYMBOL, threads)
            why = f"torch's {path.name}"
    if lib is None:
        from numba import cfunc, types

        @cfunc(types.int32(types.int32))
        def no_threads(n):  # MKL absent: nothing to pin
            return 1

        _no_threads = no_threads
        ll.add_symbol(THREADS_SYMBOL, no_threads.address)
    _mkl = (lib, why)
    return _mkl


def mkl_threads_here(n: int) -> int | None:
    """Set MKL's thread count for the calling thread only (``MKL_Set_Num_Threads_Local``; 0
    = back to the global setting); returns the previous local value, or None where MKL is
    absent.  torch's matrix products honor it (measured: ``torch.mm`` then runs on the
    calling thread alone), so a caller can take them off torch's OpenMP team for a while
    without touching any process-wide setting."""
    global _threads_setter
    if _threads_setter is None:
        with _lock:
            lib, _why = _open_mkl()
        if lib is None:
            return None
        setter = lib.MKL_Set_Num_Threads_Local
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        _threads_setter = setter
    return int(_threads_setter(int(n)))


def _scipy_sgemm() -> int:
    from numba.core.extending import get_cython_function_address

    return get_cython_function_address("scipy.linalg.cython_blas", "sgemm")


def f32_gemm(load: bool = True) -> tuple[bool, str]:
    """``(True, what runs)`` when float32 tiles go to MKL's ``sgemm``, else ``(False, what runs and why)``.

    With ``load`` the first answer binds :data:`SGEMM_SYMBOL` for the rest of the process
    (the float32 kernels need it before they load); :data:`F32_ENV_VAR` is read then.
    ``load=False`` answers from the environment and the library's presence (``dotattn info``).
    """
    global _f32_state
    forced = os.environ.get(F32_ENV_VAR, "").strip().lower() in _OFF
    with _lock:
        if _f32_state is not None:
            return _f32_state
        if not load:
            path = _torch_library()
            if forced:
                return False, f"OpenBLAS sgemm (SciPy's), forced by {F32_ENV_VAR}={os.environ[F32_ENV_VAR]}"
            if path is None:
                return False, "OpenBLAS sgemm (SciPy's): MKL needs PyTorch's libtorch_cpu.so; torch is not installed"
            return True, f"MKL sgemm (from torch's {path.name})"
        import llvmlite.binding as ll

        lib, why = _open_mkl()
        address = None
        if lib is not None and not forced:
            try:
                address = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
            except AttributeError as exc:
                why = f"{why} has no sgemm_ ({exc})"
        if address is not None:
            _f32_state = (True, f"MKL sgemm (from {why})")
        else:
            address = _scipy_sgemm()
            reason = f"forced by {F32_ENV_VAR}={os.environ[F32_ENV_VAR]}" if forced else f"MKL {why}"
            _f32_state = (False, f"OpenBLAS sgemm (SciPy's), {reason}")
        ll.add_symbol(SGEMM_SYMBOL, address)
        return _f32_state


def bf16_gemm(load: bool = True) -> tuple[bool, str]:
    """``(True, what runs)`` when bfloat16 tiles go to the bfloat16 instructions, else ``(False, why not)``.

    With ``load`` the first ``True`` answer opens the library and registers its functions with
    Numba's linker (≈ 0.5 s, once per process): compiled kernels of the bfloat16 path need
    that before they load.  ``load=False`` answers from the CPU flags and the library's
    presence only (``dotattn info``).
    """
    global _state
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in _OFF:
        return False, f"float32 fallback forced by {ENV_VAR}={os.environ[ENV_VAR]}"
    with _lock:
        if _state is not None:
            return _state
        features = _cpu_features()
        isa = [name for name in ("amx-bf16", "avx512bf16") if name in features]
        path = _torch_library()
        if not isa:
            _state = (False, "float32 fallback: this CPU has neither avx512_bf16 nor amx-bf16")
        elif path is None:
            _state = (False, "float32 fallback: needs PyTorch's libtorch_cpu.so (its MKL bfloat16 GEMM); torch is not installed")
        elif not load:
            return True, f"MKL cblas_gemm_bf16bf16f32 on {' + '.join(isa)} (from torch's {path.name})"
        else:
            lib, why = _open_mkl()
            try:
                if lib is None:
                    raise AttributeError(why)
                gemm = ctypes.cast(lib.cblas_gemm_bf16bf16f32, ctypes.c_void_p).value
            except AttributeError as exc:
                _state = (False, f"float32 fallback: {path.name} has no MKL bfloat16 GEMM ({exc})")
            else:
                import llvmlite.binding as ll

                ll.add_symbol(GEMM_SYMBOL, gemm)
                _state = (True, f"MKL cblas_gemm_bf16bf16f32 on {' + '.join(isa)} (from torch's {path.name})")
        return _state


def _request_amx_state() -> tuple[bool, str]:
    """Ask Linux for the AMX tile data state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``),
    once per process; without it the first tile instruction kills the process (SIGILL)."""
    global _amx_permission
    if _amx_permission is None:
        import platform

        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            _amx_permission = (False, "AMX tiles need Linux on x86-64")
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
            if libc.syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
                _amx_permission = (True, "")
            else:
                _amx_permission = (False, f"Linux refused the AMX tile state (errno {ctypes.get_errno()})")
    return _amx_permission


def amx_tiles(load: bool = True) -> tuple[bool, str]:
    """``(True, what runs)`` when the bfloat16 forward multiplies its tiles on AMX itself
    (:mod:`._cpu_amx`), else ``(False, why not)``: MKL's bfloat16 GEMM then does.

    Needs the bfloat16 path (:func:`bf16_gemm`), a CPU with ``amx-tile`` and ``amx-bf16``, the
    OS's permission (asked here, once, with ``load``) and ``DOTATTN_CPU_AMX`` not ``off``
    (read on every call: tests force the MKL route with it).
    """
    forced = os.environ.get(AMX_ENV_VAR, "").strip().lower()
    if forced in _OFF:
        return False, f"MKL's bfloat16 GEMM, AMX tiles forced off by {AMX_ENV_VAR}={os.environ[AMX_ENV_VAR]}"
    on, why = bf16_gemm(load=load)
    if not on:
        return False, why
    if not {"amx-tile", "amx-bf16"} <= _cpu_features():
        return False, "MKL's bfloat16 GEMM: this CPU has no AMX tiles"
    if load:
        with _lock:
            ok, why = _request_amx_state()
        if not ok:
            return False, f"MKL's bfloat16 GEMM: {why}"
    return True, "AMX tile products of our own (Q·Kᵀ, P·V; the backward's K·Qᵀ, V·dOᵀ), MKL's bfloat16 GEMM for the backward's others"


def f32_amx_products(load: bool = True) -> tuple[bool, str]:
    """``(True, what runs)`` when float32 calls may multiply their score products (and the
    backward's ``dPᵀ``) on AMX as split bfloat16 products (:mod:`._cpu_amx_f32`), else ``(False,
    why not)``: MKL's float32 ``sgemm`` tiles then do.  Needs AMX (:func:`amx_tiles`) and
    ``avx512bf16`` (the splits' conversions), and ``DOTATTN_F32_PRODUCTS`` not ``mkl``."""
    forced = os.environ.get(F32_PRODUCTS_ENV_VAR, "").strip().lower()
    if forced in _OFF + ("mkl", "sgemm"):
        return False, f"float32 sgemm tiles, AMX forced off by {F32_PRODUCTS_ENV_VAR}={os.environ[F32_PRODUCTS_ENV_VAR]}"
    on, why = amx_tiles(load=load)
    if not on:
        return False, f"float32 sgemm tiles ({why})"
    if "avx512bf16" not in _cpu_features():
        return False, "float32 sgemm tiles (this CPU has no avx512bf16)"
    which = (
        "the score products, the forward's P·V and all five backward products"
        if f32_all_products()
        else "the score products and the backward's dP"
    )
    return True, (
        f"AMX for {which} (each float32 product six bfloat16 products of split operands, bf16x6) "
        "on simple calls, operands in range"
    )


def f32_all_products() -> bool:
    """Whether the float32 backward on the split route takes all five products on AMX
    (``DOTATTN_F32_PRODUCTS=amx5``; default :data:`F32_ALL_PRODUCTS_DEFAULT`), not only ``Sᵀ``
    and ``dPᵀ``: P's and dS's pieces from the exp and dS passes, dQ accumulated transposed."""
    forced = os.environ.get(F32_PRODUCTS_ENV_VAR, "").strip().lower()
    if forced in ("amx5", "all"):
        return True
    if forced == "amx":
        return False
    return F32_ALL_PRODUCTS_DEFAULT


def f32_products_forced() -> bool:
    """Whether ``DOTATTN_F32_PRODUCTS`` asks for the split route by name (``amx``/``amx5``): then
    every simple call takes it, windowed ones too; unset, dense and causal calls do
    (``cpu.f32_split_route``: windowed calls compute few of their tiles; not measured on the
    route)."""
    return os.environ.get(F32_PRODUCTS_ENV_VAR, "").strip().lower() in ("amx", "amx5", "all")
