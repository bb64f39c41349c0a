"""The float32 product route this machine measured at install: split-AMX or MKL's tiles.

float32 calls on the ``cpu`` backend multiply their tiles one of two ways
(:func:`dotattn.kernels.cpu.f32_split_route`): as six bfloat16 products of split operands on
AMX (``amx5``, where the CPU has AMX), or with MKL's float32 ``sgemm`` tiles (``mkl``).  Both
meet the same accuracy rule against the float64 reference; which one is faster is a property
of the machine, not only of its instruction set:

* on the Xeon of 30 Nov – 1 Dec morning the split route made the float32 backward ≈ 13 %
  faster (all five products 190.5 against 222.0 ms, dense H8 L4096 D64) and fwd+bwd 1.22×
  torch SDPA;
* on the Xeon of 1 Dec afternoon (model 207, shared with other tenants), three interleaved
  measurements over two sessions found MKL's tiles faster in every case: forward 11–25 %, fwd+bwd
  4–60 % (docs/performance-log.md, "The sixth session: …", its part "float32's product route").

So ``dotattn precompile`` (which ``make install`` runs) times both routes on this machine —
whole forward+backward calls, the routes alternated round by round, medians — and stores the
faster beside the precompiled kernels, keyed by the CPU (MKL's on a near tie:
:data:`SPLIT_MARGIN`).  Every later process reads it once.  A process's results then depend
on the stored choice only: the same bits call after call and process after process on this
machine.  ``DOTATTN_F32_PRODUCTS`` pins a route whatever is
stored (``amx``/``amx5``/``mkl``); with no stored choice (a read-only package, another CPU, no
AMX) the split route stays the default where AMX runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

ROUTES = ("amx5", "mkl")
FILE_NAME = "f32_route.json"
# Moves the stored choice elsewhere; "none" ignores any (the test suite sets it: its float32
# tests hold the split route wherever AMX runs, whatever this machine measured).
FILE_ENV_VAR = "DOTATTN_F32_ROUTE_FILE"
# What a measurement times: the two shapes (D 64 and D 128, the same work) at a quarter
# of their heads and length — long enough for the products to dominate as they do at scale,
# short enough that the measurement takes a few seconds at install.  Both head dims: on the
# model-207 host the routes tied at D 64 (amx5 60, mkl 62 ms, 2 Dec 00:25) while the split route's
# D 128 fwd+bwd was 1.29× MKL's (H4 L4096: 976 against 758 ms, f32_route_ab.py, 00:40), and a
# D 64 measurement alone had stored it.
SHAPES = ((1, 4, 2048, 64), (1, 2, 2048, 128))
ROUNDS = 7
# The split route is stored only when its median is below this fraction of MKL's; a closer
# result stores MKL.  The quarter-size measurement has favoured the split route more than whole
# calls do: on the model-207 host it stored amx5 at 203.7 against 208.4 ms (2 Dec 08:27), while
# the shapes, alternated in one process minutes later, ran MKL's tiles 7–9 % faster
# forward and 17–24 % fwd+bwd (f32_route_ab.py, 08:39; docs/performance-log.md, "float32's route:
# a tie goes to MKL").  Where the split route really wins (the 30 Nov Xeon: its backward 13 %
# faster) it wins by more than this.
SPLIT_MARGIN = 0.95


def path() -> Path | None:
    """Where the choice is stored: beside the precompiled kernels, or :data:`FILE_ENV_VAR`'s
    file; None when that variable says ``none``."""
    from ._cpu_cache import PRECOMPILED_DIR

    given = os.environ.get(FILE_ENV_VAR, "").strip()
    if given.lower() == "none":
        return None
    return Path(given) if given else PRECOMPILED_DIR / FILE_NAME


def cpu_key() -> str:
    """This CPU: its model name, the instruction sets LLVM sees and the cores — a choice stored
    on another machine (a copied environment) does not apply here."""
    from ._cpu_isa import _cpu_features

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "model\t", "cpu family")):
                    model += line.split(":", 1)[1].strip() + ";"
                elif not line.strip():
                    break
    except OSError:
        pass
    features = hashlib.sha256(",".join(sorted(_cpu_features())).encode()).hexdigest()[:16]
    return f"{model}{features};{os.cpu_count()}"


@functools.lru_cache(maxsize=1)
def stored() -> dict[str, Any] | None:
    """The choice stored for this CPU (read once per process: :func:`read_stored`)."""
    return read_stored()


def read_stored() -> dict[str, Any] | None:
    """The choice stored for this CPU, or None: no file (or ``none``), an unreadable or foreign
    one, or a route not known here."""
    where = path()
    if where is None:
        return None
    try:
        record = json.loads(where.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("cpu") != cpu_key() or record.get("route") not in ROUTES:
        return None
    return record


def describe(record: dict[str, Any]) -> str:
    ms = record.get("ms", {})
    timing = ", ".join(f"{r} {ms[r]:.0f} ms" for r in ROUTES if isinstance(ms.get(r), (int, float)))
    return f"measured on this machine by `dotattn precompile` at {record.get('when', '?')} ({timing}, fwd+bwd medians)"


@contextlib.contextmanager
def pinned(route: str | None):
    """``DOTATTN_F32_PRODUCTS`` set to ``route`` (None: unset) inside the block, restored after
    (the variable is read on every call)."""
    from ._cpu_isa import F32_PRODUCTS_ENV_VAR

    saved = os.environ.pop(F32_PRODUCTS_ENV_VAR, None)
    if route is not None:
        os.environ[F32_PRODUCTS_ENV_VAR] = route
    try:
        yield
    finally:
        os.environ.pop(F32_PRODUCTS_ENV_VAR, None)
        if saved is not None:
            os.environ[F32_PRODUCTS_ENV_VAR] = saved


def available() -> tuple[bool, str]:
    """Whether this machine can take the split route at all (AMX, ``avx512bf16``), whatever
    ``DOTATTN_F32_PRODUCTS`` says: ``(True, what)`` or ``(False, why not)``."""
    from ._cpu_isa import f32_amx_products

    with pinned(None):
        return f32_amx_products()


def record(ms: dict[str, float], rounds: int, shapes) -> dict[str, Any]:
    """What :func:`store` writes for the routes' median times ``ms`` (a round's time: one call
    of each of ``shapes``; :func:`dotattn.kernels.cpu.measure_f32_routes` measures them): the
    split route where it is faster by :data:`SPLIT_MARGIN`, else MKL's tiles."""
    return {
        "cpu": cpu_key(),
        "route": "amx5" if ms["amx5"] < SPLIT_MARGIN * ms["mkl"] else "mkl",
        "ms": dict(ms),
        "rounds": rounds,
        "shapes": [list(shape) for shape in shapes],
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def store(record: dict[str, Any]) -> bool:
    """Write ``record`` beside the precompiled kernels (atomically); False where the package
    directory is not writable or :data:`FILE_ENV_VAR` says ``none`` (the split route then stays
    the default)."""
    target = path()
    if target is None:
        return False
    tmp = target.with_name(f".{FILE_NAME}.{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    finally:
        stored.cache_clear()
    return True
