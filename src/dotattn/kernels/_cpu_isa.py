"""bfloat16 matrix products at the CPU's speed: which instructions this CPU has, and who runs them.

The ``cpu`` kernels' bfloat16 path multiplies bfloat16 tiles with float32 accumulation
(``vdpbf16ps`` of ``avx512_bf16``, or the AMX tile unit where the CPU has ``amx-bf16``)
through Intel MKL's ``cblas_gemm_bf16bf16f32``.  MKL comes with PyTorch: torch's
``libtorch_cpu.so`` links it statically and exports that function, so nothing is downloaded
and nothing extra is installed — the library is opened by path (``torch`` is not imported)
and its functions are handed to Numba's linker under names of our own.

The bfloat16 path runs when all of these hold; otherwise bfloat16 inputs take the float32
path (converted once, as before).  :func:`bf16_gemm` says which, and why:

* the CPU reports ``avx512bf16`` or ``amx-bf16`` (LLVM's view of CPUID);
* ``libtorch_cpu.so`` is found next to an installed ``torch`` and exports the function;
* ``DOTATTN_CPU_BF16`` is not ``off`` (set it to force the float32 fallback).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from pathlib import Path

ENV_VAR = "DOTATTN_CPU_BF16"
# Names under which the kernels link MKL's functions (llvmlite's add_symbol).
GEMM_SYMBOL = "dotattn_cblas_gemm_bf16bf16f32"
THREADS_SYMBOL = "dotattn_mkl_set_num_threads_local"

_lock = threading.Lock()
_state: tuple[bool, str] | None = None
_library = None  # keeps the CDLL (and its symbols) alive


def _cpu_features() -> set[str]:
    import llvmlite.binding as ll

    return {f[1:] for f in ll.get_host_cpu_features().flatten().split(",") if f.startswith("+")}


def _torch_library() -> Path | None:
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib" / "libtorch_cpu.so"
    return path if path.exists() else None


def bf16_gemm(load: bool = True) -> tuple[bool, str]:
    """``(True, what runs)`` when bfloat16 tiles go to the bfloat16 instructions, else ``(False, why not)``.

    With ``load`` the first ``True`` answer opens the library and registers its functions with
    Numba's linker (≈ 0.5 s, once per process): compiled kernels of the bfloat16 path need
    that before they load.  ``load=False`` answers from the CPU flags and the library's
    presence only (``dotattn info``).
    """
    global _state, _library
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("off", "0", "false", "no", "fallback"):
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
            try:
                lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
                gemm = ctypes.cast(lib.cblas_gemm_bf16bf16f32, ctypes.c_void_p).value
                threads = ctypes.cast(lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value
            except (OSError, AttributeError) as exc:
                _state = (False, f"float32 fallback: {path.name} has no MKL bfloat16 GEMM ({exc})")
            else:
                import llvmlite.binding as ll

                ll.add_symbol(GEMM_SYMBOL, gemm)
                ll.add_symbol(THREADS_SYMBOL, threads)
                _library = lib
                _state = (True, f"MKL cblas_gemm_bf16bf16f32 on {' + '.join(isa)} (from torch's {path.name})")
        return _state
