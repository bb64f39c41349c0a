"""The ``cpu`` backend: fused tiled attention compiled by Numba (forward, backward, weights).

This module prepares an :class:`~dotattn.semantics.AttentionCall` for the kernels of
:mod:`dotattn.kernels._cpu_kernels` (compute-dtype contiguous q, K/V packed into key blocks,
options as flat arrays of one type each so a single compiled specialization serves every
call) and runs them with BLAS limited to one thread: the kernels' own threads each run
their blocks' GEMMs.  Every option of ``docs/semantics.md`` is computed in-kernel;
``score_mod``/``mask_mod``/``block_mask`` (``call.extras``) are compiled into a private copy
of the kernels (see :func:`kernels_for`).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import inspect
import math
import os
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _affinity
from . import _blas
from . import _forked
from . import _launch
from ._blas import ONE_BLAS_THREAD
from ..errors import AttentionTypeError, AttentionValueError
from ..semantics import BFLOAT16, AttentionCall
from . import _cpu_cache, _workspace, cpu_small
from ._cpu_blockmask import DEFAULT_BLOCK_SIZE, BlockMask, compile_mod
from ._cpu_options import NO_PAIRS, Options, flat_pairwise
from .dropout import seed_key
from .numpy_tiled import all_finite as _numpy_all_finite  # one finiteness check for both backends

NAME = "cpu"
EXTRAS = ("score_mod", "mask_mod", "block_mask")
# The backward does five GEMMs per block to the forward's two: wider key blocks amortize its
# per-block work better (measured in docs/performance.md).  A block mask's tiles override both.
# A PARTIAL tile on MKL's products runs only the keys its rows may see (lengths, causal,
# window; _cpu_kernels._key_extent): a causal diagonal tile whose rows see the first half of
# its 512 keys computes 256 of them.
DEFAULT_BACKWARD_BLOCK_SIZE = (256, 512)
# On the bfloat16 instructions (AMX) the GEMMs cost less and 256-key blocks stay in L2 better:
# dense H8 L4096 D64 backward, thread time, one process (load 3.5–4): 256×256 290–307 ms,
# 128×512 286–305, 256×512 350–375, 512×512 390 (docs/performance.md).
BF16_BACKWARD_BLOCK_SIZE = (256, 256)
# The bfloat16 backward's Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ on our AMX tile product (_cpu_amx.scores,
# q's and dO's rows packed once per call: bf16_backward_amx) where D and Dv are whole AMX
# steps, as the forward's rule: whole backward calls, H8 L4096 D64 (dense, causal) and H4
# D128, one process, alternated, 1.15–1.23× faster than MKL for these two products
# (docs/performance.md, 1 Dec "bfloat16 backward on AMX").  Since 1 Dec evening all five:
# dQᵀ += Kᵀ·dS too (Kᵀ per key tile, dS in key pairs from the dS pass itself, dQᵀ's parts by
# query tiles): bwd64/bwd128/bwd-causal 0.88–0.97× (docs/performance.md, "the fifth product").
# DOTATTN_CPU_BWD_AMX=off forces MKL for all five.
BWD_AMX_ENV_VAR = "DOTATTN_CPU_BWD_AMX"
# Windows and packed documents: narrower tiles than a dense call's waste less work on the
# band's ragged edges (window ±256 at L = 4096: 44 ms with 256×256 tiles, 37 ms with 64×128,
# 30 Nov).  On 1 Dec's afternoon host (model 207) 128 × 128 beat 64 × 128 wherever the band is
# wider than NARROW_WINDOW_SPAN keys, and for documents (whose tiles then line up with them):
# H8 L4096 D64, tiles alternated in one process, medians of 7 (13:36–13:42, load 1.1–1.6),
# 128 × 128 over 64 × 128 — float32 forward: window ±256 0.94 / 0.91, ±128 0.81, documents of
# 512 0.83 / 0.84, of 256 0.93, of 128 0.86, a (512, 0) window 1.01, but ±64 1.09; backward
# ±256 0.97, documents of 512 0.94, ±64 1.24; bfloat16 forward 0.87–0.94 (±64 0.89), backward
# ±256 0.90, documents 0.88, ±64 1.16.  Narrow windows keep 64 × 128.
SPARSE_BLOCK_SIZE = (128, 128)
NARROW_WINDOW_BLOCK_SIZE = (64, 128)
NARROW_WINDOW_SPAN = 192  # keys a query row may see through the window (left + right + 1)
# float32 (and bfloat16) forwards of packed documents (segment ids, no causal mask, window, dense mask or user
# functions): 256 × 256 tiles where they compute no more scores than 128 × 128 tiles (within
# DOCUMENT_WIDE_TILE_MAX_EXTRA: the documents' boundaries fall on 256s, or nearly all tiles lie
# inside one document or outside it), else SPARSE_BLOCK_SIZE (:func:`document_block_size`).
# H8 L4096 D64, tiles alternated in one process (2 Dec 02:18–02:25, load 0.8–1.4), 256 × 256 over
# 128 × 128, median ratios: documents of 1024 0.86, of 512 0.89–0.93 in four runs of five (1.04),
# of 256 0.89–1.03 (four runs); but documents of 128 2.11–2.18, uneven ones on 128s 1.25–1.37.
# The rule against 128 × 128 (02:25, load 1.0–1.2): documents of 512 0.93, of 256 0.91; H4 D128
# 0.94 / 0.99.  Windows keep 128 × 128: nothing else of eight tiles tried was faster.
# bfloat16 operands (AMX) as well: 256 × 256 over 128 × 128 (02:47, load 0.8–1.0, 11 rounds):
# documents of 512 0.87, of 256 0.93.
DOCUMENT_FORWARD_BLOCK_SIZE = (256, 256)
DOCUMENT_WIDE_TILE_MAX_EXTRA = 0.02
# float32 forwards on MKL's tiles without causal mask, window, segments or user functions: key
# tiles twice as deep (fewer tile passes per key: running max, rescale, task bookkeeping).  The
# split route keeps the default: with its P·V on split products too, 256 × 512 gave nothing
# there (H8 L4096 D64 dense, tiles alternated in one process, medians of 9, 3 Dec 07:10:
# 256 × 512 107.9 ms, 256 × 256 106.4, 128 × 256 112.8) and held per thread twice the tile
# buffers (P's pieces among them) — and the backward's key tiles are 256 deep.  Dense H8 L4096
# D64, tiles alternated in one process, three runs (load 1.1–1.4): medians 156.0 → 149.0,
# 156.7 → 152.5, 183.5 → 177.3 ms; D128 and causal no faster (causal 86.0 → 90.0: its
# diagonal tiles mask twice the keys), so they keep the default (value dims ≤ 64 only).
# Causal forwards keep 256 × 256 also since PARTIAL tiles compute only the keys their rows see
# (_cpu_kernels._key_extent, 2 Dec): 256 × 512 over 256 × 256, H8 D64 0.979 / 0.977 / 1.000 /
# 1.048, H4 D128 0.958 / 1.011 / 1.069 / 1.007 (four runs alternated in one process, load 1.3–1.7).
DENSE_F32_FORWARD_BLOCK_SIZE = (256, 512)
# The float32 backward on the split-AMX route (f32_split_route): with all five products at
# 256 × 512 the tile's pieces (6 bytes an element) pass the 2 MiB L2, at 128 × 256 the split
# tile measured 1.24–1.34× MKL's (benchmarks/f32_split_tile.py).  Whole backward, dense H8
# L4096 D64, two threads, routes alternated in one process (03:23–03:25, load 0.9–1.5), ms:
# MKL 256×512 306.8 / 296.6 / 303.9; Sᵀ, dPᵀ split at 256×512 277.9 / 297.8 / 315.0, at
# 128×256 271.8 / 282.8 / 299.4; all five at 128×256 269.8 / 278.4 / 302.2.
# Taken since 1 Dec 06:25 (the backward had set 256 × 512 before reading it): backward alone,
# 256×512 → 128×256 alternated in one process, medians of 9 (06:22–06:24, load 2.4–2.8): dense
# H8 D64 271.4 → 257.1 ms, causal H8 D64 303.8 → 284.2, H4 D128 258.5 → 275.0 and 467.9 → 469.4
# (CPU 497 → 477, 467 → 472): level at D128.
F32_SPLIT_BACKWARD_BLOCK_SIZE = (128, 256)

# float32 GQA causal forwards (the grouped kernel; per-head tiles, G·BQ rows per GEMM):
# SmolLM's prompt pass (Hq 9, Hkv 3, L 512, D 64) — see docs/performance.md.
GROUPED_CAUSAL_F32_BLOCK_SIZE = (128, 128)
# ... and up to this many keys, 64 × 64 tiles: under a causal mask a diagonal 128 × 128 tile
# computes twice the scores its rows may see, a quarter of all the scores at L 512 (a ninth
# with 64 × 64 tiles), and the 192-row GEMMs lose less than that.  SmolLM's shape, one thread,
# alternating in one process (01:00, load 1.6–2.3; docs/models.md, 1 Dec): L 256 1.27 → 1.12 ms,
# L 512 3.59 → 3.37, L 1024 11.35 → 11.22; L 2048 41.9 → 42.4 and L 4096 163 → 167 keep 128.
GROUPED_CAUSAL_F32_SMALL_BLOCK_SIZE = (64, 64)
GROUPED_CAUSAL_F32_SMALL_MAX_KEYS = 1024

_KERNEL_MODULE = "dotattn.kernels._cpu_kernels"
_KERNEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cpu_kernels.py")
_user_kernels: dict[tuple[Any, Any], types.ModuleType] = {}
_user_lock = threading.Lock()


def default_kernels() -> types.ModuleType:
    """The disk-cached kernels without user functions."""
    from . import _cpu_kernels

    return _cpu_kernels


def kernels_for(score_mod=None, mask_mod=None) -> types.ModuleType:
    """Kernels with the user's ``score_mod``/``mask_mod`` compiled in (one copy per pair, per process).

    The kernel module's source runs again in a namespace whose globals
    ``score_mod_fn``/``mask_mod_fn`` are the user's compiled functions: Numba inlines them
    into the hot loops, and dead-code elimination removes them when absent.

    When every user function is self-contained (see :func:`_portable_source`), that copy is
    a real file in :func:`user_kernel_dir`, named by a hash of its whole text and Numba's
    version, and compiled with ``cache=True``: the next process with the same functions
    loads the machine code from disk instead of compiling (a forward 40–79 s, a backward
    28–44 s on the 2-core EPYC of 7 Dec 2026, as busy as it was: the one-thread entries only,
    :func:`_run_tasks`).  Other functions (closures, captured arrays, other globals) get an
    in-memory copy compiled once per process.
    """
    if score_mod is None and mask_mod is None:
        return default_kernels()
    key = (score_mod, mask_mod)
    with _user_lock:
        module = _user_kernels.get(key)
        if module is not None:
            return module
        module = _cached_user_kernels(score_mod, mask_mod)
        if module is None:
            module = _in_memory_user_kernels(score_mod, mask_mod)
        _user_kernels[key] = module
        return module


def _in_memory_user_kernels(score_mod, mask_mod) -> types.ModuleType:
    spec = importlib.util.find_spec(_KERNEL_MODULE)
    name = f"{_KERNEL_MODULE}_user{len(_user_kernels)}"
    module = types.ModuleType(name)
    module.__dict__.update(
        __file__=spec.origin,
        __package__="dotattn.kernels",
        _JIT_CACHE=False,
        HAS_SCORE_MOD=score_mod is not None,
        HAS_MASK_MOD=mask_mod is not None,
    )
    if score_mod is not None:
        module.score_mod_fn = compile_mod(score_mod, "score_mod")
    if mask_mod is not None:
        module.mask_mod_fn = compile_mod(mask_mod, "mask_mod")
    sys.modules[name] = module  # Numba resolves a function's globals through its module
    with open(spec.origin, encoding="utf-8") as f:
        exec(compile(f.read(), spec.origin, "exec"), module.__dict__)
    return module


def user_kernel_dir() -> Path:
    """Where kernel copies for self-contained user functions live (and Numba caches them).

    ``user_kernels`` in :func:`_cpu_cache.user_cache_root` (``$DOTATTN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dotattn``, else ``~/.cache/dotattn``).
    """
    return _cpu_cache.user_cache_root() / "user_kernels"


_FUTURE_LINE = "from __future__ import annotations\n"
# A fixed modification time for every generated file: Numba's cache index records the source
# file's (mtime, size), so two processes writing the same text must leave the same stamp.
_GENERATED_MTIME = 1_000_000_000


def _cached_user_kernels(score_mod, mask_mod) -> types.ModuleType | None:
    """The disk-cacheable kernel copy for these functions, or None when one is not portable."""
    from . import _cpu_kernels

    kernel_globals = vars(_cpu_kernels)
    parts = []
    for fn, role in ((score_mod, "score_mod"), (mask_mod, "mask_mod")):
        if fn is None:
            continue
        compile_mod(fn, role)  # the same type check (and error) as the in-memory path
        portable = _portable_source(fn, f"_dotattn_user_{role}", kernel_globals)
        if portable is None:
            return None
        parts.append((role, portable))
    spec = importlib.util.find_spec(_KERNEL_MODULE)
    with open(spec.origin, encoding="utf-8") as f:
        kernel_source = f.read()
    if kernel_source.count(_FUTURE_LINE) != 1:
        return None
    import numba

    lines = [
        _FUTURE_LINE.rstrip(),
        f'"""Generated by dotattn.kernels.cpu.kernels_for from {_KERNEL_MODULE}; do not edit."""',
        "from numba import njit as _user_njit",
    ]
    bound: dict[str, str] = {}
    for role, (header, source, fn_name) in parts:
        for line in header:
            name = line.split()[-1] if line.startswith("import ") else line.split(" = ")[0]
            if bound.setdefault(name, line) != line:
                return None  # score_mod and mask_mod need one name bound to two values
        lines += header + [source]
        flag = "HAS_SCORE_MOD" if role == "score_mod" else "HAS_MASK_MOD"
        lines += [f"{role}_fn = _user_njit(cache=True)({fn_name})", f"{flag} = True"]
    lines += ["_JIT_CACHE = True", "", kernel_source.replace(_FUTURE_LINE, "", 1)]
    text = "\n".join(lines)
    # The kernels import cached primitives whose changes Numba's cache of this file would not
    # notice: their sources (and Numba's version) go into the name, so a change makes a new file.
    digest = hashlib.sha256(text.encode())
    for dep in ("_cpu_primitives", "_cpu_options", "_cpu_isa", "_cpu_simd", "dropout"):
        dep_spec = importlib.util.find_spec(f"dotattn.kernels.{dep}")
        with open(dep_spec.origin, "rb") as f:
            digest.update(f.read())
    digest.update(numba.__version__.encode())
    stem = f"_cpu_user_{digest.hexdigest()[:24]}"
    directory = user_kernel_dir()
    path = directory / f"{stem}.py"
    _cpu_cache.lock_saves_under(directory)  # Numba caches the copy in directory/__pycache__
    try:
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a shared cache's other users
                os.utime(tmp, (_GENERATED_MTIME, _GENERATED_MTIME))
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError:
        return None  # an unwritable cache directory costs a compile per process, not an error
    # A name inside the package: the kernel source's relative imports resolve against it.
    name = f"dotattn.kernels.{stem}"
    module = sys.modules.get(name)
    if module is None:
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module  # Numba resolves a function's globals through its module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def _portable_source(fn, new_name: str, kernel_globals: dict) -> tuple[list[str], str, str] | None:
    """``(header lines, function source, name)`` that recreate ``fn`` in a generated file, or None.

    Portable means: a ``def`` or a ``lambda`` (or an ``@njit`` one) whose source is available
    and compiles to the same bytecode, without default arguments, whose globals *and closure
    variables* are only builtins, the ``math``/``numpy`` modules and int/float/bool constants.
    Those values are written into the file as module constants (so the file's hash covers
    them); a closure ``lambda b, h, i, j: abs(i - j) <= width`` becomes a module-level lambda
    reading a constant ``width``.  Captured arrays or other objects are not portable.
    """
    options = {k: v for k, v in getattr(fn, "targetoptions", {}).items() if v is not None}
    if options not in ({}, {"nopython": True}):
        return None  # an @njit(fastmath=..., ...) function: its options are not carried over
    py_func = getattr(fn, "py_func", fn)
    if not isinstance(py_func, types.FunctionType):
        return None
    code = py_func.__code__
    if py_func.__defaults__ or py_func.__kwdefaults__:
        return None
    try:
        source = textwrap.dedent(inspect.getsource(py_func))
        closure = inspect.getclosurevars(py_func)
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    header = []
    for gname, value in sorted({**closure.globals, **closure.nonlocals}.items()):
        if value is math or value is np:
            header.append(f"import {value.__name__} as {gname}" if gname != value.__name__ else f"import {gname}")
        elif type(value) in (int, bool):
            header.append(f"{gname} = {value!r}")
        elif type(value) is float:
            header.append(f"{gname} = float({repr(value)!r})")
        else:
            return None
        # The kernel source comes after the user's constants: a name it binds too would change
        # under the user's function (Numba reads globals when it compiles).
        if gname in kernel_globals and kernel_globals[gname] is not value:
            return None
        if gname == new_name:
            return None
    statement = _function_statement(source, py_func, new_name, header)
    if statement is None:
        return None
    # Guard against a source file edited since the function was defined: the statement, with
    # the closure's variables bound in an enclosing function as the original had them, must
    # compile to the live function's bytecode.
    # (The header's imports go first: CPython compiles `math.log(x)` differently when `math`
    # is imported in the same source.)
    cells = "".join(f"    {n} = None\n" for n in code.co_freevars)
    outer = f"def _dotattn_outer():\n{cells}{textwrap.indent(statement, '    ')}\n    return {new_name}\n"
    check = "\n".join(header + [outer])
    namespace: dict[str, Any] = {}
    try:
        exec(compile(check, "<dotattn-check>", "exec"), namespace)
    except SyntaxError:
        return None
    rebuilt = namespace["_dotattn_outer"]().__code__
    if (rebuilt.co_code, rebuilt.co_consts, rebuilt.co_names, rebuilt.co_freevars) != (
        code.co_code,
        code.co_consts,
        code.co_names,
        code.co_freevars,
    ):
        return None
    return header, statement, new_name


def _function_statement(source: str, py_func, new_name: str, header: list[str]) -> str | None:
    """``def new_name(...): ...`` or ``new_name = lambda ...: ...`` for ``py_func`` from its source text."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if py_func.__name__ == "<lambda>":
        # getsource gives the lines around the lambda; each lambda there is a candidate and the
        # bytecode check of the caller picks the one that is really this function
        lambdas = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
        code = py_func.__code__
        for node in lambdas:
            statement = f"{new_name} = {ast.unparse(node)}"
            cells = "".join(f"    {n} = None\n" for n in code.co_freevars)
            try:
                namespace: dict[str, Any] = {}
                outer = f"def _o():\n{cells}    {statement}\n    return {new_name}\n"
                exec(compile("\n".join(header + [outer]), "<dotattn-check>", "exec"), namespace)
            except SyntaxError:
                continue
            if namespace["_o"]().__code__.co_code == code.co_code:
                return statement
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    node = tree.body[0]
    if node.name != py_func.__name__:
        return None
    node.name = new_name
    node.decorator_list = []
    node.returns = None
    for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
        arg.annotation = None
    for arg in (node.args.vararg, node.args.kwarg):
        if arg is not None:
            arg.annotation = None
    return ast.unparse(tree)


# Numba's OpenMP/workqueue threading layers do not take parallel launches from two Python
# threads at once (a JAX callback thread and the main thread, say): kernels run one at a time.
_launch_lock = threading.Lock()


# (kernel module, kernel, dtype) launched in this process: a first launch may compile
_launched: set[tuple[str, str, str]] = set()
# A first launch that takes longer than this says that it compiles (loading takes ≈ 0.5 s).
COMPILE_NOTICE_AFTER_S = 2.0


@contextlib.contextmanager
def _kernel_launch(kernels: types.ModuleType, kernel: str, dtype, entry: str | None = None):
    """One kernel launch at a time, with BLAS limited to 1 thread (our threads run the tiles).

    The first launch of a kernel in a process compiles it when no disk cache has it (≈ 20 s
    per kernel): when it still has no machine code after :data:`COMPILE_NOTICE_AFTER_S`, a
    line on stderr says so, and another when it is done, so a first call is not a silent hang.
    """
    key = (kernels.__name__, kernel, str(dtype))
    timer, noticed = None, []
    if key not in _launched:
        started = time.perf_counter()
        user = kernels.__name__ != _KERNEL_MODULE
        what = " for your score_mod/mask_mod" if user else ""
        if not user:
            where = "once: `dotattn precompile` does it at install"
        elif kernels.__file__ != _KERNEL_FILE:
            where = "once: cached on disk for later processes"
        else:
            where = "in every process: the function captures arrays or objects"

        dispatcher = getattr(kernels, entry or _task_entry(kernels, kernel))  # the one this call runs
        # A prange entry loads (or compiles) its one-thread entry first (_entry_order): a miss
        # of either is this call's compile.
        chunk = getattr(kernels, f"_{kernel}_chunk", None) if kernel in _TASK_KERNELS else None
        compiled = [dispatcher] + ([chunk] if chunk is not None and chunk is not dispatcher else [])
        known = len(dispatcher.overloads)
        misses = sum(_cache_misses(d) for d in compiled)
        done = threading.Event()

        def watch():
            # Numba counts a cache miss just before it compiles; loading from disk counts none.
            while not done.wait(COMPILE_NOTICE_AFTER_S if not noticed else 0.5):
                if len(dispatcher.overloads) > known:
                    return  # loaded or compiled: the call itself is long
                if sum(_cache_misses(d) for d in compiled) > misses and not noticed:
                    noticed.append(True)
                    print(f"dotattn: compiling the cpu {kernel} kernel{what}, {dtype} ({where}) …", file=sys.stderr, flush=True)
                    return

        timer = threading.Thread(target=watch, daemon=True)
        timer.start()
    try:
        with _launch_lock, ONE_BLAS_THREAD:
            _affinity.ensure_pinned()  # (opt-in: DOTATTN_PIN_WORKERS; one lookup when off)
            yield timer is not None  # this process's first launch of the kernel for this dtype
    finally:
        if timer is not None:
            done.set()
            timer.join()
            if noticed:
                print(f"dotattn: … ready after {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            _launched.add(key)


def _cache_misses(dispatcher) -> int:
    stats = getattr(dispatcher, "stats", None)
    return sum(stats.cache_misses.values()) if stats is not None else 0


def _num_threads() -> int:
    """Numba's thread count: the ``prange`` kernels' team, and the chunks of ``run_chunks``'s
    pool (plain threads, which a forked child has too: ``_forked``)."""
    return _launch.num_threads()


_entries = threading.local()  # .one_thread: precompile's switch to the one-thread entries


def _one_thread_entries() -> bool:
    """Whether the ``prange`` kernels' one-thread entries run instead: in a process forked from
    one whose team ran (``_forked``), and while :func:`precompile` compiles them."""
    return bool(_forked.team_unusable()) or getattr(_entries, "one_thread", False)


def _user_kernels_module(kernels: types.ModuleType) -> bool:
    """Whether ``kernels`` is a copy with the user's ``score_mod``/``mask_mod`` (:func:`kernels_for`)."""
    return kernels.__name__ != _KERNEL_MODULE


def _task_entry(kernels: types.ModuleType, kernel: str) -> str:
    """The entry a call of ``kernel`` ("forward", "backward", "weights") runs: the ``prange``
    one on Numba's team, or the one-thread entry (``_forward_chunk``…) in a child that cannot
    use the team (:func:`_one_thread_entries`) and for the user's kernels (:func:`_run_tasks`)."""
    if kernel in _TASK_KERNELS and (_one_thread_entries() or _user_kernels_module(kernels)):
        return f"_{kernel}_chunk"
    return kernel


_TASK_KERNELS = ("forward", "backward", "weights")  # a prange entry over a one-thread entry's tasks


def _run_tasks(kernels: types.ModuleType, kernel: str, head: tuple, args: tuple, nchunks: int, first: bool) -> None:
    """``kernel`` ("forward", "backward", "weights") over its task queue: the ``prange`` entry
    ``kernel(*args, nchunks)`` on Numba's team, or ``_kernel_chunk(queue, *head, *args)`` on
    this thread alone (:func:`_one_thread_entries`) or on ``nchunks`` threads of the ``_launch``
    pool sharing one queue.  Any thread may run any task: the same bits on every path.

    The user's kernels take the pool: a ``prange`` entry links a second copy of the chunk
    entry into its own module, and LLVM optimizes it again there.  A band ``mask_mod``'s first
    forward (B1 H8 L2048 D64) took 79–98 s through the team's entry and 63–79 s as the chunk
    entry on the pool, its first backward 65–80 and 36–44 s (three alternated pairs, 7 Dec 2026,
    the 2-core EPYC, ``docs/performance-log.md``).  The calls themselves: as fast with the
    team idle; a forward right after a team launch ≈ 10 % slower on the pool (the team's
    workers spin for a while after a launch).  The package's own kernels are compiled once, at
    install (``dotattn precompile``), and keep the team."""
    entry = getattr(kernels, _task_entry(kernels, kernel))
    if entry is getattr(kernels, kernel):
        entry(*args, nchunks)
    elif _one_thread_entries():
        entry(np.zeros(1, dtype=np.int64), *head, *args)
    else:
        queue = np.zeros(1, dtype=np.int64)
        if first:  # (``_kernel_launch``'s: typing the arguments costs ≈ 0.7 ms, so not every call)
            # Loaded (or compiled) here on the caller, not by the first pool thread to start: a
            # compile's error then comes once, from this thread, and Ctrl-C does not wait on it.
            from numba import typeof

            entry.compile(tuple(typeof(a) for a in (queue, *head, *args)))
        _launch.run_chunks(lambda chunk, n: entry(queue, *head, *args), (), nchunks)


def _forward_kernel(p: Prepared, out, lse, first: bool) -> None:
    """The forward kernel's tasks (:func:`_run_tasks`)."""
    _run_tasks(p.kernels, "forward", (), (p.q, p.kp, p.vp, out, lse, p.options), _num_threads(), first)


# =================================================================================
# preparing a call
# =================================================================================


def _pack_kv(x: np.ndarray, kv_lengths, BK: int, dtype, transposed: bool = False, role: str | None = None) -> np.ndarray:
    """:func:`_pack_kv_checked`'s packed blocks."""
    return _pack_kv_checked(x, kv_lengths, BK, dtype, transposed, role)[0]


def _pack_kv_checked(x: np.ndarray, kv_lengths, BK: int, dtype, transposed: bool = False, role: str | None = None):
    """``(packed, finite)``: (B, Hkv, Lk, X) → (B, Hkv, nkb, BK, X) contiguous, zero past each
    real length; ``finite`` whether ``x`` holds no NaN/±inf where the packing checked it on
    the way (bfloat16 Vᵀ from whole tiles, :func:`_cpu_amx.pack_vt`), else None (not checked).

    A view when the input already is contiguous in ``dtype`` with ``Lk`` a multiple of BK and
    no padding to clear; otherwise one copy (padding may hold NaN and must read as zeros).
    bfloat16 blocks start at 64-byte boundaries (the AMX tile loads: ``_cpu_amx``), copied
    there if need be.  ``transposed``: each block lies transposed in memory, ``(X, BK)``
    (returned as the transposed view, still indexed ``(…, BK, X)``): the bfloat16 forward's Vᵀ.
    ``role``: a copy is the workspace's scratch for that role (:func:`_buffer`), else fresh.
    """
    B, H, L, X = x.shape
    nkb = -(-L // BK)
    aligned = dtype != BFLOAT16 or x.ctypes.data % 64 == 0
    if transposed:
        if dtype == BFLOAT16 and _whole_bf16_tiles(x, kv_lengths, BK):  # whole tiles: key pairs as uint32 words (_cpu_amx.pack_vt: 2.2 → 1.0 ms at D 128);
            # every element written, so no zeros first
            from ._cpu_amx import pack_vt

            packed = _buffer(role, (B, H, nkb, X, BK), dtype)
            finite = pack_vt(x.view(np.uint16).view(np.uint32), packed.view(np.uint16).view(np.uint32))
            return packed.swapaxes(3, 4), bool(finite)
        packed = _buffer(role, (B, H, nkb, X, BK), dtype, zero=True)
        # NumPy's strided copy: 1.16 ms for H8 L4096 D64 against 1.9 for a serial Numba loop
        # and 5.5 for a parallel one (its thread team's start, machine at load 2.3)
        for b in range(B):
            n = L if kv_lengths is None else min(int(kv_lengths[b]), L)
            full, rest = divmod(n, BK)
            if full:
                packed[b, :, :full] = x[b, :, : full * BK].reshape(H, full, BK, X).swapaxes(2, 3)
            if rest:
                packed[b, :, full, :, :rest] = x[b, :, full * BK : n].swapaxes(1, 2)
        return packed.swapaxes(3, 4), None
    if (
        aligned
        and L % BK == 0
        and x.dtype == dtype
        and x.flags.c_contiguous
        and x.flags.writeable
        and (kv_lengths is None or bool(np.all(kv_lengths == L)))
    ):
        return x.reshape(B, H, nkb, BK, X), None
    packed = _buffer(role, (B, H, nkb * BK, X), dtype, zero=True)
    if kv_lengths is None:
        packed[:, :, :L] = x
    else:
        for b in range(B):
            n = int(kv_lengths[b])
            packed[b, :, :n] = x[b, :, :n]
    return packed.reshape(B, H, nkb, BK, X), None


def _whole_bf16_tiles(x: np.ndarray, kv_lengths, BK: int) -> bool:
    """Whether ``x`` (B, H, Lk, X) is bfloat16 in C order, in whole ``BK`` tiles, every key real."""
    L, X = x.shape[2], x.shape[3]
    return (
        x.dtype == BFLOAT16
        and x.flags.c_contiguous
        and L % BK == 0
        and BK % 2 == 0
        and X % 2 == 0
        and (kv_lengths is None or bool(np.all(kv_lengths == x.shape[2])))
    )


def _by_rows(rows: int, job) -> None:
    """``job(a, b)`` over ``rows`` rows (a call's sequence-and-head rows) in one contiguous range
    per thread, on the caller and the ``_launch`` pool (``job`` must release the GIL to gain).
    Each row is done whole by one thread, so results do not depend on which thread ran it."""
    from . import _launch

    n = max(1, min(_launch.num_threads(), rows))
    _launch.run_chunks(lambda chunk, n: job(rows * chunk // n, rows * (chunk + 1) // n), (), n)


def _pack_bf16_forward_kv(k: np.ndarray, v: np.ndarray, kv_lengths, BK: int, keep: bool = False):
    """``(kp, vp, v_finite)`` as :func:`_pack_kv` and :func:`_pack_kv_checked` (``transposed``)
    give them for the bfloat16 forward, with V's transposing pack (and K's copy to a 64-byte
    boundary where it needs one) split by heads over the caller and the ``_launch`` pool
    (:func:`_cpu_amx.pack_vt` releases the GIL); or None where K and V are not whole
    bfloat16 tiles in C order.

    Both packs are copies at a few GB/s on one core: 1.8–2.9 ms a call at H8 L4096 D64 and H4
    D128 (a forward of 28–48 ms on this host), 1.4–1.6 ms split (medians of 41, alternated,
    1 Dec 15:59).  Each head's tiles are packed whole by one thread, so the bits are the same
    whichever thread packs them.  ``keep``: the packings are the workspace's scratch (:func:`_buffer`).
    """
    if not (_whole_bf16_tiles(k, kv_lengths, BK) and _whole_bf16_tiles(v, kv_lengths, BK)):
        return None
    from ._cpu_amx import pack_vt

    B, H, L, X = v.shape
    D, nkb, rows = k.shape[3], L // BK, B * H
    kp = k if k.ctypes.data % 64 == 0 and k.flags.writeable else _buffer(_KV_ROLES[0] if keep else None, k.shape, BFLOAT16)
    vp = _buffer(_KV_ROLES[1] if keep else None, (B, H, nkb, X, BK), BFLOAT16)
    # (sequence, head) rows of C-ordered views: the same array types as the whole arrays (one
    # compiled pack_vt), each chunk's rows contiguous
    k_rows = k.view(np.uint16).reshape(rows, L * D)
    kp_rows = kp.view(np.uint16).reshape(rows, L * D)
    v32 = v.view(np.uint16).view(np.uint32).reshape(rows, 1, L, X // 2)
    vp32 = vp.view(np.uint16).view(np.uint32).reshape(rows, 1, nkb, X, BK // 2)
    finite = []  # one flag per range (list.append is atomic)

    def pack(a: int, b: int) -> None:
        if kp is not k:
            np.copyto(kp_rows[a:b], k_rows[a:b])
        finite.append(bool(pack_vt(v32[a:b], vp32[a:b])))

    _by_rows(rows, pack)
    return kp.reshape(B, H, nkb, BK, D), vp.swapaxes(3, 4), all(finite)


def bf16_backward_amx(call: AttentionCall, p: "Prepared") -> bool:
    """Whether the bfloat16 backward of ``call`` runs its five tile products (``Sᵀ = K·Qᵀ``,
    ``dPᵀ = V·dOᵀ``, ``dV``, ``dK``, ``dQᵀ += Kᵀ·dS``) on our AMX tiles (``Options.bwd_amx``; dQ's
    parts then transposed by query tiles, :func:`_cpu_kernels.dq_from_tiles`): head dims and tiles whole AMX steps (:data:`AMX_QUANTUM`), :func:`amx_path` on and :data:`BWD_AMX_ENV_VAR` not ``off``; MKL otherwise."""
    if os.environ.get(BWD_AMX_ENV_VAR, "").strip().lower() in ("off", "0", "false", "no", "mkl"):
        return False
    o = p.options
    return (
        p.q.dtype == np.uint16
        and call.D % AMX_QUANTUM == 0
        and call.Dv % AMX_QUANTUM == 0
        and o.BQ % AMX_QUANTUM == 0
        and p.kp.shape[3] % AMX_QUANTUM == 0
        and amx_path()[0]
    )


def _bf16_pairs_t(x: np.ndarray, q_lens: np.ndarray, BQ: int) -> np.ndarray:
    """``(B, H, 1, X/2, nqb·BQ + 16)`` uint32: ``x``'s (bfloat16 bits, ``(B, H, L, X)``) rows in
    pairs of dims, transposed, rows past ``q_lens`` and the padding 0 (:func:`_cpu_amx.pack_pairs_t`).
    The 16 more columns put each row a cache line past a multiple of 1 KiB (``_cpu_amx.ROW_PAD``'s
    reason)."""
    return _bf16_packed_rows([_pairs_t_packing(x, BQ)], q_lens)[0]


def _bf16_row_pairs(x: np.ndarray, q_lens: np.ndarray, BQ: int) -> np.ndarray:
    """``(B, H, 1, nqb·BQ/2, X)`` uint32: ``x``'s (bfloat16 bits, ``(B, H, L, X)``) rows in pairs
    of rows, rows past ``q_lens`` and the padding 0 (:func:`_cpu_amx.pack_row_pairs`)."""
    return _bf16_packed_rows([_row_pairs_packing(x, BQ)], q_lens)[0]


def _bf16_query_side_pairs(q: np.ndarray, dout: np.ndarray, q_lens: np.ndarray, BQ: int, keep: bool = False) -> list[np.ndarray]:
    """``[qv, dov, qrows, dorows]``: :func:`_bf16_pairs_t` and :func:`_bf16_row_pairs` of q and
    of dO (the bfloat16 AMX backward's query-side operands), in one hand-off to the pool: each
    thread packs its heads of all four (one head's q read by both packings in turn).  Four
    hand-offs took 2.88 ms at H4 L4096 D128, one 2.39 (medians of 31, alternated, 2 Dec 13:07).
    ``keep``: the four are the workspace's scratch (:func:`_buffer`)."""
    q_t, q_rows = _pairs_t_packing(q, BQ), _row_pairs_packing(q, BQ)
    do_t, do_rows = _pairs_t_packing(dout, BQ), _row_pairs_packing(dout, BQ)
    roles = ("bwd q pairs t", "bwd q row pairs", "bwd dO pairs t", "bwd dO row pairs") if keep else None
    qv, qrows, dov, dorows = _bf16_packed_rows([q_t, q_rows, do_t, do_rows], q_lens, roles)
    return [qv, dov, qrows, dorows]


def _pairs_t_packing(x: np.ndarray, BQ: int) -> tuple:
    """:func:`_bf16_pairs_t`'s ``(pack, source, shape)`` for :func:`_bf16_packed_rows`."""
    from ._cpu_amx import pack_pairs_t

    B, H, L, X = x.shape
    nq = -(-L // BQ) * BQ
    source = np.ascontiguousarray(x).view(np.uint16).view(np.uint32).reshape(B * H, L, X // 2)
    return pack_pairs_t, source, (B, H, 1, X // 2, nq + 16)


def _row_pairs_packing(x: np.ndarray, BQ: int) -> tuple:
    """:func:`_bf16_row_pairs`'s ``(pack, source, shape)`` for :func:`_bf16_packed_rows`."""
    from ._cpu_amx import pack_row_pairs

    B, H, L, X = x.shape
    nq = -(-L // BQ) * BQ
    source = np.ascontiguousarray(x).view(np.uint16).reshape(B * H, L, X)
    return pack_row_pairs, source, (B, H, 1, nq // 2, X)


def _bf16_packed_rows(packings: list, q_lens: np.ndarray, roles=None) -> list[np.ndarray]:
    """For each ``(pack, source, shape)`` (a ``_cpu_amx`` packing ``pack(source, lens, out, a, b)``
    of (sequence, head) rows ``a … b−1``; every ``shape`` ``(B, H, …)`` with the same B and H), a
    64-byte-aligned uint32 array of ``shape`` (fresh, or the workspace's for ``roles[i]``: every
    element is written), packed; split by rows over the caller and the pool (:func:`_by_rows`),
    each thread running every packing on its rows in the list's order.
    Each row is packed whole by one thread: the bits do not depend on the split."""
    B, H = packings[0][2][0], packings[0][2][1]
    lens = np.repeat(np.asarray(q_lens, dtype=np.int64), H)
    roles = roles or [None] * len(packings)
    outs = [_buffer(role, shape, np.uint32) for (_, _, shape), role in zip(packings, roles)]
    jobs = [(pack, source, out.reshape((B * H,) + shape[3:])) for (pack, source, shape), out in zip(packings, outs)]

    def job(a: int, b: int) -> None:
        for pack, source, flat in jobs:
            pack(source, lens, flat, a, b)

    _by_rows(B * H, job)
    return outs


def _empty_aligned(shape, dtype, allocate=np.empty) -> np.ndarray:
    """``allocate(shape, dtype)`` (``np.empty`` or ``np.zeros``) starting at a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = allocate(n * dtype.itemsize + 64, dtype=np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip : skip + n * dtype.itemsize].view(dtype).reshape(shape)


def _zeros_aligned(shape, dtype) -> np.ndarray:
    """``np.zeros(shape, dtype)`` starting at a 64-byte boundary."""
    return _empty_aligned(shape, dtype, np.zeros)


def _buffer(role: str | None, shape, dtype, zero: bool = False) -> np.ndarray:
    """A 64-byte-aligned ``shape`` array of ``dtype`` (zeros if ``zero``, else uninitialized):
    the calling thread's workspace buffer for ``role`` — per-call scratch kept between calls
    (:mod:`._workspace`: a process's allocator mode cost a bfloat16 D128 fwd+bwd ≈ 30 % in page
    faults) — or fresh memory for None (arrays that go back to the caller, or callers such as
    tests that keep what they get)."""
    if role is None:
        return _zeros_aligned(shape, dtype) if zero else _empty_aligned(shape, dtype)
    return _workspace.scratch(role, shape, dtype, zero)


# The workspace roles of prepare(keep=True)'s K and V copies (forward or backward: one at a time)
_KV_ROLES = ("k tiles", "v tiles")


def release_workspace() -> int:
    """Free the per-call scratch buffers the ``cpu`` backend keeps between calls (every
    thread's; :mod:`._workspace`), returning the bytes dropped.  The next call allocates them
    again.  ``DOTATTN_CPU_WORKSPACE_MB`` bounds what a thread keeps (default 256; 0: nothing)."""
    return _workspace.release()


def amx_path() -> tuple[bool, str]:
    """``(True, what runs)`` when the bfloat16 forward multiplies its tiles on AMX (``_cpu_amx``), else ``(False, why not)``."""
    from ._cpu_isa import amx_tiles

    return amx_tiles()


# The AMX tile products take whole 32-wide steps (rows, keys, head dims); other shapes
# take MKL's bfloat16 GEMM.
AMX_QUANTUM = 32


def storage_dtype(call: AttentionCall) -> np.dtype:
    """The dtype of the kernels' GEMM operands: bfloat16 where the bfloat16 instructions run
    (:func:`bf16_path`), else the compute dtype (float16/bfloat16 inputs converted to float32)."""
    if call.dtype == BFLOAT16 and bf16_path()[0]:
        return BFLOAT16
    return call.compute_dtype


def as_kernel_operand(x: np.ndarray) -> np.ndarray:
    """bfloat16 arrays as their uint16 bits (Numba has no bfloat16 type); others unchanged."""
    return x.view(np.uint16) if x.dtype == BFLOAT16 else x


def f32_gemm_path() -> tuple[bool, str]:
    """``(True, what runs)`` when float32 tiles go to MKL's sgemm, else ``(False, what runs and why)``."""
    from ._cpu_isa import f32_gemm

    return f32_gemm()


def _bind_f32_gemm() -> None:
    """Bind the float32 kernels' sgemm (MKL or OpenBLAS) once, before they first load."""
    global _f32_bound
    if not _f32_bound:
        f32_gemm_path()
        _f32_bound = True


_f32_bound = False


def bf16_path() -> tuple[bool, str]:
    """``(True, what runs)`` when bfloat16 calls use the CPU's bfloat16 instructions, else ``(False, why not)``."""
    from ._cpu_isa import bf16_gemm

    return bf16_gemm()


def _contiguous(x: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous, writeable, in ``dtype`` (one compiled specialization for every input)."""
    if x.dtype == dtype and x.flags.c_contiguous and x.flags.writeable:
        return x
    return np.array(x, dtype=dtype, order="C", copy=True)


@dataclass
class Prepared:
    """What the kernels take: the kernel module, compute dtype, q, packed K/V and the options."""

    kernels: types.ModuleType
    T: np.dtype
    q: np.ndarray
    kp: np.ndarray
    vp: np.ndarray
    options: Options
    v_finite: bool | None = None  # V checked for NaN/±inf while packed (None: not checked)


def user_mods(call: AttentionCall):
    """``(score_mod, mask_mod, block_mask)`` of ``call.extras``, validated."""
    score_mod = call.extras.get("score_mod")
    mask_mod = call.extras.get("mask_mod")
    bm = call.extras.get("block_mask")
    if score_mod is not None and not callable(score_mod):
        raise AttentionTypeError(
            f"score_mod must be a function (score, b, h, q_idx, kv_idx) -> score, got {score_mod!r}"
        )
    if mask_mod is not None and not callable(mask_mod):
        raise AttentionTypeError(
            f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {mask_mod!r}"
        )
    if bm is not None:
        if not isinstance(bm, BlockMask):
            raise AttentionTypeError(
                f"block_mask must come from dotattn.block_mask(mask_mod, ...), got {type(bm).__name__}"
            )
        if mask_mod is None:
            mask_mod = bm.mask_mod
        elif mask_mod is not bm.mask_mod:
            raise AttentionValueError(
                "block_mask was built from another mask_mod than the one passed; pass the same function "
                "(or only block_mask=, which carries its mask_mod)"
            )
        bm.check_call(call.B, call.Hq, call.Lq, call.Lk)
    return score_mod, mask_mod, bm


# Tile sides are rounded up to this many rows/keys: the score tile's inner loops run over the
# BQ query rows, and 16 float32 lanes fill one AVX-512 register.
TILE_QUANTUM = 16


def _narrow_window(call: AttentionCall) -> bool:
    """A window through which a query row sees fewer than :data:`NARROW_WINDOW_SPAN` keys."""
    if call.window is None:
        return False
    left, right = call.window
    return left is not None and right is not None and left + right + 1 < NARROW_WINDOW_SPAN


def fit_block(BQ: int, BK: int, Lq: int, Lk: int) -> tuple[int, int]:
    """A tile no larger than the problem (rounded up to :data:`TILE_QUANTUM`).

    A 256 × 256 tile for an 11-token sentence computed 540× the scores it needed (and packed
    K/V into 256-key blocks): short sequences get tiles of their own size instead.
    """

    def fit(block: int, L: int) -> int:
        return max(1, min(int(block), -(-max(L, 1) // TILE_QUANTUM) * TILE_QUANTUM))

    return fit(BQ, Lq), fit(BK, Lk)


def prepare(
    call: AttentionCall,
    block_size: tuple[int, int] | None = None,
    forward: bool = False,
    grouped: bool = False,
    split: bool = False,
    keep: bool = False,
) -> Prepared:
    """Everything the kernels need for ``call``, without any ``Lq × Lk`` array.

    ``forward``: for the forward kernel — bfloat16 operands then get V transposed (``accᵀ +=
    Vᵀ·P``) and, where :func:`amx_path` allows and the sizes are whole AMX steps, the AMX
    tile products (``Options.amx``).  ``grouped``: for the grouped forward, which reads q and
    the K/V tiles in place where it can (any strides; :func:`_kv_tiles`).  ``keep``: K's and
    V's copies are the workspace's scratch (:func:`_buffer`; :func:`forward` and
    :func:`backward`, whose Prepared lives for the call only), else fresh arrays.
    """
    score_mod, mask_mod, bm = user_mods(call)
    T = call.compute_dtype
    if bm is not None:
        BQ, BK = bm.block_size
    elif block_size is not None:
        BQ, BK = block_size
    elif call.window is not None or call.q_segment_ids is not None:
        BQ, BK = NARROW_WINDOW_BLOCK_SIZE if _narrow_window(call) else SPARSE_BLOCK_SIZE
    else:
        BQ, BK = DEFAULT_BLOCK_SIZE
    if bm is None:
        BQ, BK = fit_block(BQ, BK, call.Lq, call.Lk)
    if split:  # the split-AMX products take whole 32-steps (f32_split_route)
        BQ, BK = -(-BQ // AMX_QUANTUM) * AMX_QUANTUM, -(-BK // AMX_QUANTUM) * AMX_QUANTUM
    B = call.B
    S = storage_dtype(call)
    if S == np.float32:
        _bind_f32_gemm()
    if grouped:  # float32 only (_grouped_f32): copies only for another dtype or read-only memory
        in_place = call.q.dtype == S and call.q.strides[3] == call.q.itemsize and call.q.flags.writeable
        q = call.q if in_place else _contiguous(call.q, S)
        k_role, v_role = _KV_ROLES if keep else (None, None)
        kp, vp = _kv_tiles(call.k, call.kv_lengths, BK, S, k_role), _kv_tiles(call.v, call.kv_lengths, BK, S, v_role)
    v_transposed = forward and S == BFLOAT16
    v_finite = None
    if not grouped:
        q = as_kernel_operand(_contiguous(call.q, S))
        packed = _pack_bf16_forward_kv(call.k, call.v, call.kv_lengths, BK, keep) if v_transposed else None
        if packed is None:
            k_role, v_role = _KV_ROLES if keep else (None, None)
            kp = _pack_kv(call.k, call.kv_lengths, BK, S, role=k_role)
            vp, v_finite = _pack_kv_checked(call.v, call.kv_lengths, BK, S, transposed=v_transposed, role=v_role)
        else:
            kp, vp, v_finite = packed
        kp, vp = as_kernel_operand(kp), as_kernel_operand(vp)
    amx = (
        v_transposed
        and all(n % AMX_QUANTUM == 0 for n in (BQ, BK, call.D, call.Dv))
        and amx_path()[0]
    )
    q_lens = (
        np.full(B, call.Lq, dtype=np.int64)
        if call.q_lengths is None
        else np.array(call.q_lengths, dtype=np.int64)
    )
    kv_lens = (
        np.full(B, call.Lk, dtype=np.int64)
        if call.kv_lengths is None
        else np.array(call.kv_lengths, dtype=np.int64)
    )
    bias, bstr = flat_pairwise(call.bias, T)
    mask, mstr = flat_pairwise(call.mask, np.uint8)
    slopes = (
        np.zeros((1, 1), dtype=T)
        if call.alibi_slopes is None
        else np.array(call.alibi_slopes, dtype=T, order="C")
    )
    causal = {None: 0, "bottom_right": 1, "top_left": 2}[call.causal]
    left, right = call.window if call.window is not None else (None, None)
    left = -1 if left is None else int(left)
    right = -1 if right is None else int(right)
    if call.q_segment_ids is None:
        q_seg = kv_seg = np.zeros((1, 1), dtype=np.int64)
    else:
        q_seg = np.array(call.q_segment_ids, dtype=np.int64, order="C")
        kv_seg = np.array(call.kv_segment_ids, dtype=np.int64, order="C")
    key = seed_key(call.seed) if call.dropout_p > 0.0 else np.uint64(0)
    options = Options(
        BQ=int(BQ),
        Lq=call.Lq,
        Lk=call.Lk,
        q_lens=q_lens,
        kv_lens=kv_lens,
        scale=float(call.scale),
        softcap=float(call.softcap or 0.0),
        bias=bias,
        bstr=bstr,
        has_bias=call.bias is not None,
        slopes=slopes,
        has_alibi=call.alibi_slopes is not None,
        mask=mask,
        mstr=mstr,
        has_dense_mask=call.mask is not None,
        causal=causal,
        left=left,
        right=right,
        q_seg=q_seg,
        kv_seg=kv_seg,
        has_seg=call.q_segment_ids is not None,
        shift=int(call.position_shift),
        top_left_offset=int(call.top_left_offset),
        dropout_p=float(call.dropout_p),
        dropout_key=np.uint64(key),
        dropout_geom=np.array(call.dropout_geometry, dtype=np.int64),
        bm=np.zeros((1, 1, 1, 1), dtype=np.int8) if bm is None else np.ascontiguousarray(bm.classes),
        bm_on=bm is not None,
        amx=bool(amx),
    )
    return Prepared(kernels=kernels_for(score_mod, mask_mod), T=T, q=q, kp=kp, vp=vp, options=options, v_finite=v_finite)


# =================================================================================
# non-finite inputs (docs/semantics.md): the kernels' matrix products would multiply a
# hidden key's weight 0 by its NaN value (0·NaN = NaN) and their exp2 maps NaN to 0, so
# calls whose values are not all finite run on the NumPy backend, which follows the policy
# pair by pair (calls with user score_mod/mask_mod, which NumPy cannot run, stay here);
# NaN/+inf scores from finite inputs (overflow) are caught in the forward kernel
# =================================================================================


def _all_finite(x: np.ndarray) -> bool:
    """No NaN/±inf in ``x``.  bfloat16 arrays, and the kernels' uint16 views of their bits
    (:func:`as_kernel_operand`; no other uint16 array comes here), are checked on their
    exponent bits: NumPy sums uint16 as integers (always "finite": a NaN in a hidden key's
    value then reached the bfloat16 kernels, whose 0·NaN leaked it into rows that never
    see that key), and the bits take one pass instead of a slow bfloat16 sum."""
    if x.dtype == np.uint16 or x.dtype == BFLOAT16:
        # NaN/±inf are the bits 0x7F80–0x7FFF and 0xFF80–0xFFFF: the largest as uint16 finds the
        # negative ones, the largest as int16 (where the negative half sorts below 0) the
        # positive ones — two reads, where masking the sign wrote a temporary and read it again
        # (0.45 → 0.30 ms for 4 MiB, medians of 41, 2 Dec 13:10; every one of the 65,536
        # patterns checked in the tests)
        bits = x.view(np.uint16)
        return bits.size == 0 or (int(bits.max()) < 0xFF80 and int(bits.view(np.int16).max()) < 0x7F80)
    if x.dtype == np.float32 and x.flags.c_contiguous and x.size:
        # the largest magnitude's bits (_cpu_amx_f32._abs_bits_max: one integer pass, 0.29 ms for
        # 8 MiB against NumPy's sum's ≈ 0.6): below 0x7F800000 when nothing is NaN or ±inf
        from ._cpu_amx_f32 import _abs_bits_max

        flat = x.reshape(1, 1, x.size, 1)
        return int(_abs_bits_max(flat, np.array([x.size], dtype=np.int64))) < 0x7F800000
    return _numpy_all_finite(x)


def _real_rows_finite(x: np.ndarray, call: AttentionCall) -> bool:
    """``x (B, Hq, Lq, X)`` finite in the rows inside ``q_lengths`` (padding may hold anything)."""
    if call.q_lengths is None:
        return _all_finite(x)
    return all(_all_finite(x[b, :, : call.q_len(b)]) for b in range(call.B))


def _lse_ok(lse: np.ndarray, call: AttentionCall) -> bool:
    """Finite or −inf (a row that saw no key) in the real rows: what the kernels take."""
    lse = np.asarray(lse)
    parts = [lse] if call.q_lengths is None else [lse[b, :, : call.q_len(b)] for b in range(call.B)]
    return all(_all_finite(x) or bool(np.all(np.isfinite(x) | (x == -np.inf))) for x in parts)


def _inputs_finite(call: AttentionCall, p: "Prepared") -> bool:
    """q (real rows), packed k/v, bias (−inf is a mask) and ALiBi slopes all finite."""
    if not (_real_rows_finite(p.q, call) and _all_finite(p.kp) and _all_finite(p.vp)):
        return False
    bias = p.options.bias
    if call.bias is not None and not _all_finite(np.where(bias == -np.inf, 0, bias)):
        return False
    return call.alibi_slopes is None or _all_finite(call.alibi_slopes)


# The bfloat16 Δ's widened rows per step (2 × 256 KiB of float32 at D 128: in L2)
DELTA_BLOCK_ROWS = 512
# The workspace role of the backward's dO scaled by the LSE's rounding fix (float32)
_DOUT_ROLE = "bwd dO fixed"


def _backward_checks_and_delta(call: AttentionCall, p: "Prepared", out, dout, lse):
    """``(finite, Δ, dO for the kernel)`` for a bfloat16 or float32 backward, on the caller and
    the ``_launch`` pool thread (NumPy's passes, ``einsum`` and the finiteness scans release the
    GIL); None where the call needs the general checks (options with arrays of their own, padded
    query rows, O or dO not in the operands' dtype in C order, short problems).

    Each thread takes half the rows of dO and O: it checks one half of the operands (q, K and V
    on one thread, dO and O on the other), sums its rows of Δ = rowsum(dO ∘ O) in float32 and, for
    float32 operands whose P the kernel rebuilds from the LSE, scales its rows of dO and Δ by the
    LSE's rounding fix (:func:`lse_rounding_fix`).  Every step is elementwise or per row, so the
    bits are the serial steps' (``einsum`` per row, dO·fix in float32, Δ·fix in float64 then
    rounded).  bfloat16 → float32 is exact (the bits shifted up by 16), so a bfloat16 Δ is
    ``einsum``'s on ml_dtypes' ``astype``, which holds the GIL and took most of the serial
    ≈ 5.7 ms (H8 L4096 D64: 3.8 ms split, medians of 21, 1 Dec 16:20).  float32, H8 L4096 D64:
    the backward's ≈ 20 ms outside the kernel were serial (1 Dec 23:27).
    """
    out, dout = np.asarray(out), np.asarray(dout)
    S = np.float32 if p.q.dtype == np.float32 else BFLOAT16
    if (
        call.extras
        or call.q_lengths is not None
        or call.bias is not None
        or call.alibi_slopes is not None
        or not all(x.dtype == S and x.flags.c_contiguous for x in (out, dout))
        or p.q.dtype not in (np.uint16, np.float32)
    ):
        return None
    from . import _launch

    if not _lse_ok(lse, call):
        return False, None, None
    B, Hq, Lq, Dv = out.shape
    rows = B * Hq
    delta = np.empty((B, Hq, Lq), dtype=np.float32)
    o_rows, do_rows, delta_rows = out.reshape(rows, Lq, Dv), dout.reshape(rows, Lq, Dv), delta.reshape(rows, Lq)
    fix = None if S == BFLOAT16 or _p_from_tile_softmax(p) else lse_rounding_fix(lse).reshape(rows, Lq)
    dout_k = as_kernel_operand(dout) if fix is None else _buffer(_DOUT_ROLE, dout.shape, dout.dtype)
    if fix is not None:
        fix32, dk_rows = fix.astype(np.float32)[..., None], dout_k.reshape(rows, Lq, Dv)
    # the general path's checks, in two halves of about the same bytes: one per chunk (the
    # inputs' half first where one thread runs)
    checks = [lambda: _inputs_finite(call, p), lambda: _all_finite(dout) and _all_finite(out)]
    nchunks = 2 if rows >= 2 and _launch.num_threads() >= 2 else 1
    finite = [] if nchunks == 2 else [checks.pop(0)()]

    # bfloat16 Δ from float32 widenings of DELTA_BLOCK_ROWS query rows at a time, in two
    # workspace buffers per thread that stay in L2 (whole-half widenings were four fresh 4 MiB
    # arrays a call at H4 L4096 D128: written, then read back from memory)
    block = min(DELTA_BLOCK_ROWS, Lq)
    flat_do, flat_o, flat_delta = dout.reshape(rows * Lq, Dv), out.reshape(rows * Lq, Dv), delta.reshape(rows * Lq)
    widened = [] if S != BFLOAT16 else [
        (_buffer(f"bwd delta dO rows {c}", (block, Dv), np.uint32), _buffer(f"bwd delta O rows {c}", (block, Dv), np.uint32))
        for c in range(nchunks)
    ]

    def bf16_delta(chunk: int, a: int, b: int) -> None:
        wide_do, wide_o = widened[chunk]
        for i in range(a * Lq, b * Lq, block):
            j = min(i + block, b * Lq)
            # bfloat16 bits → the float32 they are (one pass: the shift widens as it goes)
            np.left_shift(flat_do[i:j].view(np.uint16), np.uint32(16), out=wide_do[: j - i], dtype=np.uint32)
            np.left_shift(flat_o[i:j].view(np.uint16), np.uint32(16), out=wide_o[: j - i], dtype=np.uint32)
            np.einsum("ld,ld->l", wide_do[: j - i].view(np.float32), wide_o[: j - i].view(np.float32),
                      dtype=np.float32, out=flat_delta[i:j])

    def job(chunk: int, n: int) -> None:
        a, b = rows * chunk // n, rows * (chunk + 1) // n
        finite.append(checks[chunk]())  # (list.append is atomic)
        if S == BFLOAT16:
            bf16_delta(chunk, a, b)
        else:
            np.einsum("rld,rld->rl", do_rows[a:b], o_rows[a:b], dtype=np.float32, out=delta_rows[a:b])
        if fix is not None:
            np.multiply(do_rows[a:b], fix32[a:b], out=dk_rows[a:b])
            delta_rows[a:b] = delta_rows[a:b] * fix[a:b]

    _launch.run_chunks(job, (), nchunks)
    return all(finite), delta, dout_k


def _sum_dq_parts(dq_parts: np.ndarray, scale, nchunks: int) -> np.ndarray:
    """``scale · Σ dq_parts`` in a fixed order (bitwise repeatable), by halves of the rows on
    the caller and the ``_launch`` pool thread (NumPy's ufuncs release the GIL)."""
    from . import _launch

    dq = dq_parts[0]
    rows = dq.shape[0] * dq.shape[1]
    flat = dq_parts.reshape((dq_parts.shape[0], rows) + dq.shape[2:])

    def job(chunk: int, n: int) -> None:
        a, b = rows * chunk // n, rows * (chunk + 1) // n
        for part in flat[1:]:
            flat[0, a:b] += part[a:b]
        flat[0, a:b] *= scale

    _launch.run_chunks(job, (), nchunks if rows >= 2 else 1)
    return dq


def _numpy_backend():
    from . import numpy_tiled

    return numpy_tiled


# =================================================================================
# the passes
# =================================================================================


def forward(
    call: AttentionCall, block_size: tuple[int, int] | None = None, grouped: bool | None = None, final: bool = False
):
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` in the compute dtype.

    ``grouped``: run the GQA kernel that stacks a group's query heads (True; only where
    :func:`_grouped_f32` allows it) or the per-head one (False); None decides by that rule.
    ``block_size`` is per head either way.  ``final``: ``out`` in bfloat16 for calls on the
    bfloat16 path (the kernel rounds its rows as it writes them: the cast of a float32 output
    afterwards took 1.2–1.4 ms idle, 4–8 ms loaded, for H8 L4096 D64); for callers that keep
    no float32 part (``dispatch.run_forward``'s ``final``), as the merges of partials do.
    """
    if grouped is None:
        grouped = _grouped_f32(call)
    elif grouped and not _grouped_f32(call):
        raise ValueError("grouped=True needs a call that _grouped_f32 accepts")
    if block_size is None and grouped:
        small = call.Lk <= GROUPED_CAUSAL_F32_SMALL_MAX_KEYS
        block_size = GROUPED_CAUSAL_F32_SMALL_BLOCK_SIZE if small else GROUPED_CAUSAL_F32_BLOCK_SIZE
    split = not grouped and f32_split_route(call)
    if block_size is None and _dense_f32(call) and not split:
        block_size = DENSE_F32_FORWARD_BLOCK_SIZE
    if block_size is None and _documents_only(call):
        block_size = document_block_size(call)
    p = prepare(call, block_size, forward=True, grouped=grouped, split=split, keep=True)
    tops = _forward_largest(p) if split else None  # (V's finiteness and q's and K's range, one pass)
    if tops is not None:
        v_finite = bool(np.isfinite(tops["v"]))
    else:
        v_finite = _all_finite(p.vp) if p.v_finite is None else p.v_finite
    if not call.extras and not v_finite:
        return _numpy_backend().forward(call)
    if split:
        p = _with_split_operands(p, call, tops=tops)
    return _run_forward(call, p, grouped, final)


# =================================================================================
# float32 on AMX as split bfloat16 products (_cpu_amx_f32; docs/performance-log.md, "float32 on
# AMX as split bfloat16 products")
# =================================================================================


def f32_products_path(load: bool = True) -> tuple[bool, str]:
    """``(True, what runs)`` when float32 calls may take the split-AMX products, else ``(False,
    why not)``: no AMX, ``DOTATTN_F32_PRODUCTS=mkl``, or — the variable unset — MKL's tiles
    measured faster on this machine at install (:mod:`.f32_route`)."""
    from . import f32_route
    from ._cpu_isa import F32_PRODUCTS_ENV_VAR, f32_amx_products

    on, why = f32_amx_products(load=load)
    if on and not os.environ.get(F32_PRODUCTS_ENV_VAR, "").strip():
        record = f32_route.stored()
        if record is not None and record["route"] == "mkl":
            return False, f"float32 sgemm tiles, faster here than AMX's split products: {f32_route.describe(record)}"
    return on, why


def measure_f32_routes(rounds: int | None = None, shapes=None, clock=time.perf_counter) -> dict:
    """Time a float32 forward+backward of each of ``shapes`` (:data:`f32_route.SHAPES`) under each
    of :data:`f32_route.ROUTES`, alternated round by round (the order flipped every round), after
    one untimed round: a route's round is the sum over the shapes, its figure the median of its
    rounds — the record :func:`f32_route.store` writes (``dotattn precompile`` runs this on a CPU
    with AMX)."""
    from .. import semantics
    from . import f32_route

    rounds = f32_route.ROUNDS if rounds is None else rounds
    shapes = f32_route.SHAPES if shapes is None else tuple(shapes)
    rng = np.random.default_rng(0)
    cases = []
    for shape in shapes:
        q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
        cases.append((semantics.normalize(q, k, v), dout))
    times: dict[str, list[float]] = {r: [] for r in f32_route.ROUTES}
    for r in range(rounds + 1):
        for route in f32_route.ROUTES if r % 2 == 0 else f32_route.ROUTES[::-1]:
            with f32_route.pinned(route):
                t0 = clock()
                for call, dout in cases:
                    out, lse = forward(call)
                    backward(call, out, lse, dout)
                if r:  # round 0 warms both up
                    times[route].append((clock() - t0) * 1e3)
    return f32_route.record({route: statistics.median(t) for route, t in times.items()}, rounds, shapes)


def f32_split_route(call: AttentionCall) -> bool:
    """Whether ``call``'s score product (forward and backward) may take the split-AMX route,
    from the call alone (the operands' range is checked with their data:
    :func:`_with_split_operands`).  The simple calls: float32, dense or causal or a window,
    key/query lengths, no score chain (softcap, bias, ALiBi, score_mod), no dense mask,
    segments, user functions, dropout or block calls; not the small-call kernel's calls nor
    the short problems' float64 score sums, nor the grouped GQA causal forward — every one of
    those computes its forward scores another way, and the backward must compute them as the
    forward did (its ``P = 2^(S − lse)`` cancels the forward's rounding only then).  Forward
    and backward decide by this same rule on the same inputs.  By default dense and causal
    calls, not windowed ones: with the splits in the kernels' tasks (Options.split_in_task) the
    causal call gained — H8 L4096 D64 alternated in one process, medians of 11 (1 Dec 06:07,
    load 2.9–3.3): forward 81.1 → 67.8 ms and 145.7 → 148.2 (a run while another process held a core), backward
    198.5 → 185.5 and 361.5 → 330.8, fwd+bwd 0.889 and 0.970 — where the per-call splits had
    cost it more than it gained before (causal forward 67.2 → 72.2 ms, load 2); windows
    (compared with FlexAttention, far ahead) not measured.  ``DOTATTN_F32_PRODUCTS=amx`` takes
    windowed calls too."""
    from ._cpu_isa import f32_products_forced

    return (
        (call.window is None or f32_products_forced())
        and storage_dtype(call) == np.float32
        and call.compute_dtype == np.float32
        and not call.extras
        and call.block is None
        and call.bias is None
        and call.alibi_slopes is None
        and call.softcap is None
        and call.scale > 0.0
        and call.dropout_p == 0.0
        and call.mask is None
        and call.q_segment_ids is None
        and call.Lq > 1
        and call.Lk > 0
        and call.group * call.Lq * call.Lk > cpu_small.MAX_SCORES
        and not _grouped_f32(call)
        and f32_products_path()[0]
        and not _forked.team_unusable()  # (its operand splits run on Numba's team)
    )


def _largest_tiles(tiles: np.ndarray) -> float:
    """``_cpu_amx_f32.largest`` of the packed ``tiles (B, H, nkb, BK, X)`` (zero past the real keys)."""
    from ._cpu_amx_f32 import largest

    B, H, nkb, BK, X = tiles.shape
    return largest(tiles.reshape(B, H, nkb * BK, X), np.full(B, nkb * BK, dtype=np.int64))


def _in_range(rows: np.ndarray, lens: np.ndarray, tiles: np.ndarray) -> bool:
    """Whether ``rows (B, H, L, X)`` (its rows within ``lens``: padding may hold anything) and
    the packed ``tiles (B, H, nkb, BK, X)`` (zero past the real keys) lie in the split route's range."""
    from ._cpu_amx_f32 import largest, ok_range

    return ok_range(largest(rows, lens)) and ok_range(_largest_tiles(tiles))


def _forward_largest(p: Prepared) -> dict[str, float]:
    """The largest magnitudes of the forward's operands on the split route (q in its real rows,
    K and V packed; NaN where a NaN or ±inf is there) in one pass on ``_launch.run_chunks``
    (``_cpu_amx_f32.operand_tops``): V's serves the NaN policy, q's and K's the route's range,
    where NumPy's sum over V and a serial pass over q and K each read them (≈ 1.3 ms at H8
    L4096 D64, load 1)."""
    from ._cpu_amx_f32 import bits_to_largest, operand_tops
    from ._launch import run_chunks

    nchunks = _num_threads()
    tops = np.zeros((nchunks, 3), dtype=np.uint32)
    run_chunks(operand_tops, (p.q, p.kp, p.vp, p.options.q_lens, tops), nchunks)
    top = tops.max(axis=0)
    return {name: bits_to_largest(int(t)) for name, t in zip(("q", "k", "v"), top)}


@dataclass
class _QuerySide:
    """What :func:`_query_side_pass` leaves for the split route's backward."""

    tops: dict[str, float]  # largest magnitudes of q, dout, out, k, v (NaN: a NaN or ±inf there)
    dout_k: np.ndarray  # dO with the LSE's rounding fix per row (the kernel's dO)
    delta: np.ndarray  # Δ = fix · rowsum(dO ∘ O), float32
    pieces: dict[str, np.ndarray]  # qpc, dopc and (all five products) qrp, dorp: split


def _query_side_pass(p: Prepared, call: AttentionCall, out: np.ndarray, lse: np.ndarray, dout: np.ndarray) -> _QuerySide:
    """The split route backward's per-call work on its operands in one pass over each
    (``_cpu_amx_f32.split_query_side`` on ``_launch.run_chunks``): the checks of q, K, V, dO and
    O (NaN policy and range), dO's LSE fix, Δ, and q's and dO's pieces — split before the
    range is known (operands out of range, rare, leave them unused).  ``out``, ``dout`` float32
    C-contiguous, ``lse`` the float32 LSE."""
    from ._cpu_amx_f32 import bits_to_largest, split_query_side
    from ._launch import run_chunks

    o = p.options
    fix = np.ones(lse.shape) if _p_from_tile_softmax(p) else lse_rounding_fix(lse)
    dout_k = _buffer(_DOUT_ROLE, dout.shape, np.float32)  # (every element written by split_query_side)
    delta = np.empty(lse.shape, dtype=np.float32)
    pairs = _split_all_shapes(call)
    pieces = {"qpc": _column_pieces(p.q, o.q_lens, o.BQ, "backward qpc", False),
              "dopc": _column_pieces(dout, o.q_lens, o.BQ, "dopc", False)}
    if pairs:
        pieces.update(qrp=_pair_pieces(p.q, o.q_lens, o.BQ, "qrp", False),
                      dorp=_pair_pieces(dout, o.q_lens, o.BQ, "dorp", False))
    nchunks = _num_threads()
    tops = np.zeros((nchunks, 5), dtype=np.uint32)
    args = (p.q, dout, out, fix, p.kp, p.vp, o.q_lens, dout_k, delta, pieces["qpc"], pieces["dopc"],
            pieces.get("qrp", NO_PAIRS), pieces.get("dorp", NO_PAIRS), True, pairs, tops)
    run_chunks(split_query_side, args, nchunks)
    from ._cpu_primitives import _short_rows

    if _short_rows.py_func(call.Lq, call.Lk):  # (a GQA call of ≥ 33 heads a group): Δ in float64,
        # as the other route sums it (see backward)
        delta = (np.einsum("bhld,bhld->bhl", dout, out, dtype=np.float64) * fix).astype(np.float32)
    top = tops.max(axis=0)
    largest = {name: bits_to_largest(int(t)) for name, t in zip(("q", "dout", "out", "k", "v"), top)}
    return _QuerySide(largest, dout_k, delta, pieces)


# The pieces a kernel task alone reads written by that task (Options.split_in_task); False: by
# passes per call before the kernel (the A/B switch of benchmarks and tests)
SPLIT_IN_TASK = True
# The split route's forward computes PARTIAL tiles whose rows see very different keys (causal
# diagonals) in query strips of this many rows, each over its own keys (Options.strip_rows,
# _cpu_kernels._tile_in_strips; a multiple of 32, the products' step); 0: whole tiles (the A/B
# switch).  Measured: docs/performance-log.md, "float32 causal forward on the split route …"
SPLIT_STRIP_ROWS = 64
# The split route's forward with all five backward products asked for (``_cpu_isa.f32_all_products``)
# also takes ``acc += P·V`` on split products (Options.split_pv; V in range, Dv and the query
# tile in whole 32-steps); False: MKL's (the A/B switch).  Measured: docs/performance-log.md,
# "float32 forward: P·V on split products …"
SPLIT_FORWARD_PV = True

def _pieces_buffer(role: str, shape: tuple, dtype) -> np.ndarray:
    """An uninitialized 64-byte aligned array for one kind of split operand (``role``): the
    workspace's scratch (:func:`_buffer`), reused by the next call of this thread that fits
    in it — fresh memory paid its page faults on every call (≈ 1 ms per 12 MiB of pieces, up
    to 3× that when the kernel compacts for huge pages).  The arrays of H8 L4096 D64 take
    ≈ 25 MiB for a forward and 50 MiB for a backward."""
    return _buffer("pieces " + role, shape, dtype)


def _row_pieces(x: np.ndarray, role: str, split: bool = True) -> np.ndarray:
    """Per key tile, the pieces of packed ``x (B, H, nkb, BK, X)`` as A operands (rows a
    cache line apart between pieces: whole powers of two apart they share L1 sets).
    ``split=False``: the buffer only, for the backward kernel's tasks to fill
    (``Options.split_in_task``)."""
    from ._cpu_amx_f32 import padded, split_tiles

    B, H, nkb, BK, X = x.shape
    out = _pieces_buffer(role, (B, H, nkb, 3, BK + 1, padded(X)), np.uint16)
    if split:
        split_tiles(x, out)
    return out


def _column_pieces(x: np.ndarray, lens: np.ndarray, BQ: int, role: str, split: bool = True) -> np.ndarray:
    """Per head, the pieces of ``x (B, H, L, X)`` in depth pairs as B operands, columns padded
    to whole query tiles (and a cache line, so that rows are no power of two apart).
    ``split=False``: the buffer only, for the forward kernel's tasks to fill
    (``Options.split_in_task``)."""
    from ._cpu_amx_f32 import padded, split_columns

    B, H, L, X = x.shape
    Lp = -(-L // BQ) * BQ
    out = _pieces_buffer(role, (B, H, 3, padded(X) // 2, Lp + 16), np.uint32)
    if split:
        split_columns(x, lens, out, _num_threads())
    return out


def _split_all_shapes(call: AttentionCall) -> bool:
    """Whether the backward takes all five products on the split route: asked for
    (``_cpu_isa.f32_all_products``) and head dims in whole 32-steps (dK, dV and dQᵀ accumulate
    in 32 × 32 blocks)."""
    from ._cpu_isa import f32_all_products

    return call.D % AMX_QUANTUM == 0 and call.Dv % AMX_QUANTUM == 0 and f32_all_products()


def _pair_pieces(x: np.ndarray, lens: np.ndarray, BQ: int, role: str, split: bool = True) -> np.ndarray:
    """Per head, the pieces of ``x (B, H, L, X)`` in pairs of rows (the B operands of ``dK +=
    dSᵀ·Q`` and ``dV += Pᵀ·dO``), rows padded to whole query tiles.  ``split=False``: the
    buffer only (:func:`_query_side_pass` fills it)."""
    from ._cpu_amx_f32 import padded, split_row_pairs

    B, H, L, X = x.shape
    out = _pieces_buffer(role, (B, H, 3, -(-L // BQ) * BQ // 2 + 1, padded(X)), np.uint32)
    if split:
        split_row_pairs(x, lens, out)
    return out


def _transposed_row_pieces(x: np.ndarray, split: bool = True) -> np.ndarray:
    """Per key tile, the pieces of each packed tile of ``x (B, H, nkb, BK, X)`` transposed, as
    A operands: Kᵀ's for the backward's ``dQᵀ += Kᵀ·dSᵀ``, Vᵀ's for the forward's ``accᵀ +=
    Vᵀ·P``; rows a cache line longer than BK (a strided view).  One workspace role for both:
    no call holds the two at once, and a forward+backward then keeps one such buffer, not two
    (at L 8192 D 64, 3.6 MiB).  ``split=False``: the buffer only, for the backward kernel's
    tasks to fill."""
    from ._cpu_amx_f32 import padded, split_tiles_t

    B, H, nkb, BK, X = x.shape
    out = _pieces_buffer("transposed tiles", (B, H, nkb, 3, padded(X) + 1, BK + 32), np.uint16)[..., :BK]
    if split:
        split_tiles_t(x, out)
    return out


def _split_forward_pv(call: AttentionCall, BQ: int, BK: int, tops: dict[str, float] | None) -> bool:
    """Whether the split route's forward takes ``acc += P·V`` on split products too
    (:data:`SPLIT_FORWARD_PV`, with all five backward products asked for and the head dims in
    whole 32-steps: :func:`_split_all_shapes`): V's largest magnitude known (``tops``,
    :func:`_forward_largest`) and in range, and the query and key tiles — the product's
    output columns and depth — in whole 32-steps."""
    from ._cpu_amx_f32 import ok_range

    return (
        SPLIT_FORWARD_PV
        and tops is not None
        and ok_range(tops["v"])
        and BQ % AMX_QUANTUM == 0
        and BK % AMX_QUANTUM == 0
        and _split_all_shapes(call)
    )


def _with_split_operands(
    p: Prepared,
    call: AttentionCall,
    dout: np.ndarray | None = None,
    tops: dict[str, float] | None = None,
    query_pieces: dict[str, np.ndarray] | None = None,
) -> Prepared:
    """``p`` with the split-AMX operands of its score product (q and K in range: the forward and
    the backward check the same arrays, so they agree) and, given the backward's ``dout``, of
    ``dPᵀ = V·dOᵀ`` (V and dO in range) and — head dims in whole 32-steps — of the other three
    products (``split_all``).  Operands out of range keep MKL's tiles.  ``tops``: the
    backward's largest magnitudes (:func:`_query_side_pass`; of the caller's dO: its rows
    scaled by the LSE's rounding fix, within 1 ± 10⁻⁶, are what the product takes — far inside
    the range's margins).
    ``query_pieces``: q's and dO's pieces already split (:func:`_query_side_pass`); without them
    the backward splits them here, on the calling thread."""
    from ._cpu_amx_f32 import ok_range

    o = p.options
    changes: dict[str, Any] = {}
    side = "forward " if dout is None else "backward "  # (the passes' tiles differ: own buffers)
    # the pieces a kernel task alone reads are split by that task (Options.split_in_task): the
    # forward's Qᵀ per query tile, the backward's K and V per key tile (per call, on one
    # thread, Qᵀ's took 3.0–3.2 ms and K's or V's 1.8 ms each at H8 L4096 D64)
    in_task = SPLIT_IN_TASK
    if tops is not None:
        s_ok = ok_range(tops["q"]) and ok_range(tops["k"])
        dp_ok = dout is not None and ok_range(tops["dout"]) and ok_range(tops["v"])
    else:
        s_ok = _in_range(p.q, o.q_lens, p.kp)
        dp_ok = dout is not None and _in_range(dout, o.q_lens, p.vp)
    if s_ok:
        forward_in_task = in_task and dout is None
        backward_in_task = in_task and dout is not None
        split_q = dout is None and not forward_in_task or dout is not None and query_pieces is None
        qpc = query_pieces["qpc"] if query_pieces else _column_pieces(p.q, o.q_lens, o.BQ, side + "qpc", split_q)
        changes.update(split_s=True, kpc=_row_pieces(p.kp, side + "kpc", not backward_in_task), qpc=qpc)
        if dout is None:
            changes.update(strip_rows=SPLIT_STRIP_ROWS)
            if _split_forward_pv(call, o.BQ, p.kp.shape[3], tops):
                changes.update(split_pv=True, vtp=_transposed_row_pieces(p.vp))
    if dp_ok:
        dopc = query_pieces["dopc"] if query_pieces else _column_pieces(dout, o.q_lens, o.BQ, "dopc")
        changes.update(split_dp=True, vpc=_row_pieces(p.vp, "vpc", not in_task), dopc=dopc)
        if changes.get("split_s") and _split_all_shapes(call):
            if query_pieces:
                qrp, dorp = query_pieces["qrp"], query_pieces["dorp"]
            else:
                qrp, dorp = _pair_pieces(p.q, o.q_lens, o.BQ, "qrp"), _pair_pieces(dout, o.q_lens, o.BQ, "dorp")
            changes.update(split_all=True, qrp=qrp, dorp=dorp, ktp=_transposed_row_pieces(p.kp, not in_task))
    if in_task and changes:
        changes.update(split_in_task=True)
    if not changes:
        return p
    return Prepared(p.kernels, p.T, p.q, p.kp, p.vp, o._replace(**changes), p.v_finite)


def _any_layout(x: np.ndarray) -> np.ndarray:
    """``x`` behind a leading axis of length 2 and stride 0 (the kernel reads ``[0]``): a
    view Numba types as layout "A" whatever ``x``'s strides, so the grouped forward has one
    compiled specialization for the caller's strided views (SmolLM's q, k, v are slices of
    its projection buffers, read in place) and for packed copies alike."""
    return np.lib.stride_tricks.as_strided(x, (2,) + x.shape, (0,) + x.strides)


def _kv_tiles(x: np.ndarray, kv_lengths, BK: int, dtype, role: str | None = None) -> np.ndarray:
    """(B, Hkv, Lk, X) as key tiles (B, Hkv, nkb, BK, X): a strided view of ``x`` when no
    tile needs padding (``Lk`` a multiple of BK, no ``kv_lengths`` below it) and its rows are
    contiguous in ``dtype``; else :func:`_pack_kv`'s zero-padded copy (``role``: in the workspace)."""
    B, H, L, X = x.shape
    if (
        L % BK == 0
        and x.dtype == dtype
        and x.strides[3] == x.itemsize
        and x.strides[2] >= X * x.itemsize  # rows in order, apart: the tile GEMMs' leading dimension
        and x.flags.writeable
        and (kv_lengths is None or bool(np.all(kv_lengths == L)))
    ):
        sB, sH, sL, sX = x.strides
        return np.lib.stride_tricks.as_strided(x, (B, H, L // BK, BK, X), (sB, sH, BK * sL, sL, sX))
    return _pack_kv(x, kv_lengths, BK, dtype, role=role)


def _grouped_f32(call: AttentionCall) -> bool:
    """A float32 GQA/MQA causal call whose scores need no chain and whose masks are intervals
    per query row: :func:`_cpu_kernels.forward_grouped` takes it (its docstring says why)."""
    return (
        call.group > 1
        and call.causal is not None
        and call.window is None
        and call.q_segment_ids is None
        and call.mask is None
        and call.bias is None
        and call.alibi_slopes is None
        and call.softcap is None
        and call.scale > 0.0
        and call.dropout_p == 0.0
        and not call.extras
        and call.block is None
        and call.Lq > 0
        and call.Lk > 0
        and storage_dtype(call) == np.float32
    )


def _dense_f32(call: AttentionCall) -> bool:
    """A float32 call whose every query may see every key (lengths aside): :data:`DENSE_F32_FORWARD_BLOCK_SIZE`."""
    return (
        call.causal is None
        and call.window is None
        and call.q_segment_ids is None
        and call.mask is None
        and not call.extras
        and call.Dv <= 64
        and storage_dtype(call) == np.float32
    )


def _documents_only(call: AttentionCall) -> bool:
    """A call on float32 or bfloat16 operands masked by segment ids alone (lengths aside):
    :func:`document_block_size`."""
    return (
        call.q_segment_ids is not None
        and call.causal is None
        and call.window is None
        and call.mask is None
        and not call.extras
        and storage_dtype(call) in (np.float32, BFLOAT16)
    )


def segment_tile_scores(q_seg: np.ndarray, kv_seg: np.ndarray, BQ: int, BK: int) -> int:
    """Scores the forward computes for segment ids ``(B, Lq)``/``(B, Lk)`` with ``BQ × BK``
    tiles (fitted by :func:`fit_block`): ``BQ·BK`` for every tile the kernel does not skip —
    as ``_block_class`` rules, a tile whose query and key id ranges overlap."""
    B, Lq = q_seg.shape
    Lk = kv_seg.shape[1]
    BQ, BK = fit_block(BQ, BK, Lq, Lk)
    q_starts, k_starts = np.arange(0, Lq, BQ), np.arange(0, Lk, BK)
    qmin, qmax = np.minimum.reduceat(q_seg, q_starts, axis=1), np.maximum.reduceat(q_seg, q_starts, axis=1)
    kmin, kmax = np.minimum.reduceat(kv_seg, k_starts, axis=1), np.maximum.reduceat(kv_seg, k_starts, axis=1)
    lo = min(int(qmin.min()), int(kmin.min()))
    span = max(int(qmax.max()), int(kmax.max())) - lo + 1
    if span * B < 1 << 62:
        # each sequence's ids moved past the previous one's: one run of ids for the whole batch
        off = (np.arange(B, dtype=np.int64) * span - lo)[:, None]
        qmin, qmax, kmin, kmax = ((x + off).ravel() for x in (qmin, qmax, kmin, kmax))
        if np.all(kmin[1:] >= kmin[:-1]) and np.all(kmax[1:] >= kmax[:-1]):
            # ids in order (as packing writes them): the key tiles with kmin ≤ qmax are a
            # prefix, those with kmax < qmin a shorter one
            seen = np.searchsorted(kmin, qmax, side="right") - np.searchsorted(kmax, qmin, side="left")
            return int(seen.sum()) * BQ * BK
        qmin, qmax = qmin.reshape(B, -1), qmax.reshape(B, -1)
        kmin, kmax = kmin.reshape(B, -1), kmax.reshape(B, -1)
    total = 0
    for b in range(B):
        seen = (qmax[b][:, None] >= kmin[b][None, :]) & (kmax[b][None, :] >= qmin[b][:, None])
        total += int(np.count_nonzero(seen))
    return total * BQ * BK


def document_block_size(call: AttentionCall) -> tuple[int, int]:
    """The float32 and bfloat16 forward's tiles for packed documents (:data:`DOCUMENT_FORWARD_BLOCK_SIZE`
    where it computes at most :data:`DOCUMENT_WIDE_TILE_MAX_EXTRA` more scores than
    :data:`SPARSE_BLOCK_SIZE`, else the latter): taller and wider tiles pay less per score
    (fewer query-tile loads, rescales and row stores, larger products) but, across a
    document boundary, compute scores that the mask then hides."""
    q_seg, kv_seg = call.q_segment_ids, call.kv_segment_ids
    wide = segment_tile_scores(q_seg, kv_seg, *DOCUMENT_FORWARD_BLOCK_SIZE)
    narrow = segment_tile_scores(q_seg, kv_seg, *SPARSE_BLOCK_SIZE)
    return DOCUMENT_FORWARD_BLOCK_SIZE if wide <= narrow * (1.0 + DOCUMENT_WIDE_TILE_MAX_EXTRA) else SPARSE_BLOCK_SIZE


def _run_forward(call: AttentionCall, p: Prepared, grouped: bool = False, final: bool = False):
    """The forward kernel itself, whatever the inputs hold (tests check which tiles it reads).
    ``final`` and bfloat16 operands: ``out`` comes back in bfloat16 (see :func:`forward`)."""
    if final and not grouped and p.q.dtype == np.uint16:  # bf16 bits: the kernel rounds the rows it writes
        out = np.empty((call.B, call.Hq, call.Lq, call.Dv), dtype=np.uint16)
        lse = np.empty((call.B, call.Hq, call.Lq), dtype=p.T)
        with _kernel_launch(p.kernels, "forward", call.dtype) as first:
            _forward_kernel(p, out, lse, first)
        return out.view(BFLOAT16), lse
    out = np.empty((call.B, call.Hq, call.Lq, call.Dv), dtype=p.T)
    lse = np.empty((call.B, call.Hq, call.Lq), dtype=p.T)
    if grouped:
        from ._launch import run_chunks

        if call.layout == "blhd":  # written where the caller's layout wants it: finalize copies nothing
            out = np.empty((call.B, call.Lq, call.Hq, call.Dv), dtype=p.T).swapaxes(1, 2)
        queue = np.zeros(1, dtype=np.int64)  # the tasks' shared counter
        args = (queue, _any_layout(p.q), _any_layout(p.kp), _any_layout(p.vp), _any_layout(out), lse, p.options)
        with _kernel_launch(p.kernels, "forward_grouped", call.dtype):
            run_chunks(p.kernels.forward_grouped, args, _num_threads())
        return out, lse
    with _kernel_launch(p.kernels, "forward", call.dtype) as first:
        _forward_kernel(p, out, lse, first)
    return out, lse


# Backward passes of fewer multiply-adds (B·Hq·Lq·Lk·(D + Dv), forward-sized) run serially:
# the small forward path's limit (cpu_small.PARALLEL_MIN_WORK).  Above it the team pays on a
# quiet machine: B64 H4 L11 D16 causal (≈ 10⁶) took 1.09 ms with it and 1.48 ms serially,
# interleaved at load 1.3 — but 10.1 against 1.75 ms at load 4, where the team's launch
# waits for descheduled threads.
SERIAL_BACKWARD_MAX_WORK = 1 << 18


def lse_rounding_fix(lse: np.ndarray) -> np.ndarray:
    """``2^(lse₂ − lse·log₂ e)`` per row (float64), ``lse₂`` that product rounded to float32 as
    the backward kernel's ``_lse_rows`` rounds it: the factor by which the rounding scales every
    P the float32 backward rebuilds in the row (up to 6.6e-7 at logits ≈ 17; with a row's sum
    rounded the same way, dV reached 2.4× the naive error at Lq 300, Lk 681, D 8, scale 2).
    1 for rows without a finite LSE or past HUGE_SHIFT."""
    from ._cpu_primitives import HUGE_SHIFT, LOG2E  # (loaded with the kernels anyway)

    x = np.asarray(lse, dtype=np.float64) * LOG2E
    rounded = x.astype(np.float32).astype(np.float64)
    # (rows past 2^20 in base 2 take the kernel's pre-rounded exp pass: _exp2_shifted_f32)
    fixable = np.abs(rounded) < HUGE_SHIFT
    # (only where fixable: a fully masked row's −inf − −inf would warn of an invalid value)
    return np.exp2(np.subtract(rounded, x, out=np.zeros_like(x), where=fixable))


def _p_from_tile_softmax(p: Prepared) -> bool:
    """Whether the backward kernel rebuilds every P of the call from its tile's own softmax,
    not from the LSE (``exact_rows`` in ``_cpu_kernels._backward_chunk``: a short problem
    whose keys fit one tile, a whole call; float32 operands, as the caller checks).  Then the
    LSE's rounding touches no P, and dO stays as it is: scaled for it and scaled back, dO's
    rounding twice made dS = P∘(dP − Δ) ≠ 0 where it is 0 (one key a row: dQ at 0.98 of the
    3×-naive bound, Lq 38, Lk 1, D 64, scale 1.63); and the kernel forms Δ from that P
    (:func:`_delta_in_kernel`).  (The split route never
    takes such calls: it needs Lq > 1 and more scores than the small-call kernel's.)"""
    from ._cpu_primitives import _short_rows

    o = p.options
    whole_rows = o.dropout_geom[2] == 0 and o.dropout_geom[5] == o.Lk
    return bool(_short_rows.py_func(o.Lq, o.Lk) and p.kp.shape[2] == 1 and whole_rows)


def _short_problem(call: AttentionCall) -> bool:
    """``_short_rows`` of the call's sizes: what :func:`_p_from_tile_softmax` needs first."""
    from ._cpu_primitives import _short_rows

    return bool(_short_rows.py_func(call.Lq, call.Lk))


def _delta_in_kernel(call: AttentionCall, p: Prepared) -> bool:
    """Whether the backward kernel forms Δ = Σ P·dP / Σ P from its own P (``exact_rows`` in
    ``_cpu_kernels._backward_chunk``, ``_cpu_primitives._delta_from_tile``): the calls of
    :func:`_p_from_tile_softmax` in float32 or float64.  The caller then passes only −dlse."""
    return storage_dtype(call) != BFLOAT16 and _p_from_tile_softmax(p)


def backward(call: AttentionCall, out, lse, dout, want_dbias: bool = False, block_size=None, *, serial=None,
             rounded: bool = False, dlse=None):
    """``(dq, dk, dv, dbias | None)`` (dbias full ``(B, Hq, Lq, Lk)``), FlashAttention-2 style.

    ``serial``: run the one chunk on this thread (True) or the prange kernel (False); None
    decides by size (:data:`SERIAL_BACKWARD_MAX_WORK`).  :func:`precompile` forces each.
    ``rounded``: the caller rounds dq, dk and dv into new arrays before anything else sees
    them (:func:`backward_final`), so these float32 sums may be the workspace's scratch; else
    they are fresh arrays the caller keeps.
    ``dlse``: a gradient through the LSE too (canonical ``(B, Hq, Lq)``): Δ − dlse where the
    kernel forms Δ itself, else the call folded (``semantics.fold_lse_grad``).
    """
    sparse = call.window is not None or call.q_segment_ids is not None
    split = f32_split_route(call)
    given_block_size = block_size
    if block_size is None and not sparse:
        # (the split route's tiles were dead code until 1 Dec 06:25: the default was set first)
        if split:
            block_size = F32_SPLIT_BACKWARD_BLOCK_SIZE
        else:
            block_size = BF16_BACKWARD_BLOCK_SIZE if storage_dtype(call) == BFLOAT16 else DEFAULT_BACKWARD_BLOCK_SIZE

    def folded(run):  # the call with dlse folded into v, O and dO; dv without its extra column
        from .. import semantics

        return semantics.backward_with_folded_lse_grad(run, call, out, lse, dout, dlse)

    def folded_here():
        return folded(lambda c, o, l, d: backward(c, o, l, d, want_dbias, given_block_size, serial=serial,
                                                   rounded=rounded))

    def numpy_backward():
        run = _numpy_backend().backward
        if dlse is None:
            return run(call, out, lse, dout, want_dbias)
        return folded(lambda c, o, l, d: run(c, o, l, d, want_dbias))

    if dlse is not None and (split or storage_dtype(call) == BFLOAT16 or not _short_problem(call)):
        return folded_here()  # (no kernel-formed Δ: folded before anything is prepared)
    p = prepare(call, block_size, split=split, keep=True)
    in_kernel = not split and _delta_in_kernel(call, p)
    if dlse is not None and not in_kernel:
        return folded_here()
    T = p.T
    B, Hq, Lq, D = call.q.shape
    Hkv, Dv = call.Hkv, call.Dv
    dout = np.asarray(dout)
    lse_c = _contiguous(np.asarray(lse), T)
    if split:
        # one pass over q, K, V, dO and O (the split route has no bias or ALiBi): the NaN
        # policy's and the range's checks, dO's LSE fix, Δ, q's and dO's pieces
        dout_c, out_c = _contiguous(dout, T), _contiguous(np.asarray(out), T)
        side = _query_side_pass(p, call, out_c, lse_c, dout_c)
        if not (all(np.isfinite(t) for t in side.tops.values()) and _lse_ok(lse, call)):
            return _numpy_backend().backward(call, out, lse, dout, want_dbias)
        dout_k, delta = side.dout_k, side.delta
    else:
        # D_i = rowsum(dO ∘ O); for short problems summed in float64, as their scores (_short_rows):
        # a float32 sum over D 128 was the largest error left in dQ/dK at a large scale
        from ._cpu_primitives import F64_DOT_MAX_SCORES  # (loaded with the kernels anyway)

        wide = T == np.float32 and (call.Lq * call.Lk <= F64_DOT_MAX_SCORES or call.Lq == 1)
        both = None if wide else _backward_checks_and_delta(call, p, out, dout, lse_c)
        if both is None:
            if not call.extras and not (
                _inputs_finite(call, p)
                and _real_rows_finite(dout, call)
                and _real_rows_finite(np.asarray(out), call)
                and _lse_ok(lse, call)
            ):
                return numpy_backward()
            if not in_kernel:
                out_c = np.asarray(out, dtype=T)
                delta = np.einsum("bhld,bhld->bhl", np.asarray(dout, dtype=T), out_c, dtype=np.float64 if wide else T)
            dout_k = as_kernel_operand(_contiguous(dout, storage_dtype(call)))
            if dout_k.dtype == np.float32 and not _p_from_tile_softmax(p):
                # P = 2^(S − lse₂) with lse₂ rounded to float32 is off by one factor per row: dO's and
                # Δ's rows take it instead (dV = Pᵀ·dO and dS = P∘(dP − Δ) see the product only)
                fix = lse_rounding_fix(lse_c)
                dout_k = np.multiply(dout_k, fix.astype(np.float32)[..., None])
                delta = delta * fix
        elif not both[0]:
            return numpy_backward()
        else:
            delta, dout_k = both[1], both[2]
        if in_kernel:  # the kernel forms Σ P·dP / Σ P from its own P and adds it to −dlse (or 0)
            delta = np.zeros((B, Hq, Lq), dtype=T) if dlse is None else np.negative(dlse, dtype=T)
        delta = _contiguous(delta.astype(T, copy=False), T)
    # Small backward passes run on the caller's thread, without the kernel's prange team:
    # waking the team costs more than such a pass computes, and on a busy machine its launch
    # waits for every descheduled thread (the small forward path's reason, kernels/cpu_small.py).
    if serial is None:
        serial = B * Hq * Lq * call.Lk * (D + Dv) < SERIAL_BACKWARD_MAX_WORK or bool(_forked.team_unusable())
    nchunks = 1 if serial else _num_threads()
    if split:
        p = _with_split_operands(p, call, dout_k, side.tops, side.pieces)
    elif bf16_backward_amx(call, p):
        o = p.options
        qv, dov, qrows, dorows = _bf16_query_side_pairs(p.q, dout_k, o.q_lens, o.BQ, keep=True)
        p = Prepared(p.kernels, p.T, p.q, p.kp, p.vp, o._replace(
            bwd_amx=True, qv=qv, dov=dov, qrows=qrows, dorows=dorows), p.v_finite)
    # Scratch from the workspace (kept between calls: _buffer): dQ's parts where dQ is summed
    # into a new array (transposed parts), dK's and dV's tiles and dQ where they are rounded
    # into new arrays (``rounded``); the kernel adds into the dQ parts (zeros first) and writes
    # every key tile of dK and dV whole (no zeros needed)
    dq_t = p.options.split_all or p.options.bwd_amx
    if p.options.split_all:  # dQ accumulates transposed (dQᵀ += Kᵀ·dSᵀ), whole query tiles
        nq = -(-Lq // p.options.BQ) * p.options.BQ
        dq_parts = _buffer("bwd dq parts", (nchunks, B, Hq, p.options.qrp.shape[4], nq + 16), T, zero=True)
    elif dq_t:  # bfloat16 on AMX: dQᵀ += Kᵀ·dS too, by query tiles (tile loads/stores: at 64-byte boundaries)
        nqb = -(-Lq // p.options.BQ)
        dq_parts = _buffer("bwd dq parts", (nchunks, B, Hq, nqb * D, p.options.BQ + 16), T, zero=True)
    else:  # (dQ is part 0, summed in place: scratch only where rounded)
        dq_parts = _buffer("bwd dq parts" if rounded else None, (nchunks, B, Hq, Lq, D), T, zero=True)
    grads = ("bwd dk tiles", "bwd dv tiles", "bwd dq") if rounded else (None, None, None)
    # (np.zeros for fresh dK and dV: np.empty made the kernel 3–4 % slower, measured in one
    # process alternated — fresh pages faulted in inside the kernel either way; docs/performance.md)
    dkp = _buffer(grads[0], p.kp.shape[:4] + (D,), T, zero=not rounded)
    dvp = _buffer(grads[1], p.vp.shape[:4] + (Dv,), T, zero=not rounded)
    dbias = np.zeros((B, Hq, Lq, call.Lk) if want_dbias else (1, 1, 1, 1), dtype=T)
    with _kernel_launch(p.kernels, "backward", call.dtype, "_backward_chunk" if serial else None) as first:
        args = (p.q, p.kp, p.vp, dout_k, lse_c, delta, dq_parts, dkp, dvp, dbias, bool(want_dbias), p.options)
        if serial:
            p.kernels._backward_chunk(np.zeros(1, dtype=np.int64), 1, *args)  # the parallel kernel's chunk, called directly
        else:
            _run_tasks(p.kernels, "backward", (nchunks,), args, nchunks, first)
    if dq_t:  # summed, transposed and scaled in one pass
        from ._cpu_amx_f32 import dq_from_transposed
        from ._cpu_kernels import dq_from_tiles

        from ._launch import run_chunks

        dq = _buffer(grads[2], (B, Hq, Lq, D), T)
        dq_sum = dq_from_transposed if p.options.split_all else dq_from_tiles
        run_chunks(dq_sum, (dq_parts, dq, T.type(call.scale)), 1 if serial else _num_threads())
    else:
        dq = _sum_dq_parts(dq_parts, T.type(call.scale), 1 if serial else _num_threads())
    nkbBK = p.kp.shape[2] * p.kp.shape[3]
    dk = dkp.reshape(B, Hkv, nkbBK, D)[:, :, : call.Lk]
    dv = dvp.reshape(B, Hkv, nkbBK, Dv)[:, :, : call.Lk]
    return dq, dk, dv, (dbias if want_dbias else None)


def backward_final(call: AttentionCall, out, lse, dout, want_dbias: bool = False, dlse=None):
    """:func:`backward` for gradients that go to the caller as they are (``dispatch.run_backward``'s
    ``final``): a bfloat16 call gets dq, dk and dv as bfloat16, rounded by a compiled pass
    (``_cpu_primitives._round_to_bf16``: ties to even, NaN kept quiet with its sign — ml_dtypes'
    bits) instead of ``semantics.finalize_grad``'s ``astype``, which took ≈ 2.2 ms per 2 M
    elements against ≈ 0.75 (three H8 L4096 D64 gradients: 6.6 → 2.3 ms, medians, 1 Dec 16:05).
    Gradients that are not contiguous (dk/dv of a key length that is not a whole number of
    tiles) stay float32 for ``finalize_grad`` (copied: the float32 sums are workspace scratch)."""
    if call.dtype != BFLOAT16:
        return backward(call, out, lse, dout, want_dbias, dlse=dlse)
    # (dq, dk and dv are the workspace's scratch here: every one goes back as a new array)
    dq, dk, dv, dbias = backward(call, out, lse, dout, want_dbias, rounded=True, dlse=dlse)
    from ._cpu_primitives import _round_to_bf16

    def rounded(g):
        if g.dtype != np.float32:
            return g
        if not g.flags.c_contiguous:  # (out of the workspace: a float32 copy for finalize_grad)
            return g.copy()
        bits = np.empty(g.size, dtype=np.uint16)
        _round_to_bf16(g.reshape(g.size), bits)
        return bits.view(BFLOAT16).reshape(g.shape)

    return rounded(dq), rounded(dk), rounded(dv), dbias


def weights(call: AttentionCall, lse: np.ndarray, block_size=None) -> np.ndarray:
    """Pre-dropout probabilities ``(B, Hq, Lq, Lk)`` from the forward's LSE."""
    if not call.extras and not _lse_ok(lse, call):
        return _numpy_backend().weights(call, lse)
    p = prepare(call, block_size)
    P = np.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=p.T)
    lse_c = _contiguous(np.asarray(lse), p.T)
    with _kernel_launch(p.kernels, "weights", call.dtype) as first:
        _run_tasks(p.kernels, "weights", (), (p.q, p.kp, lse_c, P, p.options), _num_threads(), first)
    return P


class CpuBackend:
    """Fused Numba kernels: every option in-kernel, block skipping, user score/mask functions."""

    name = NAME

    @property
    def description(self) -> str:
        from ._cpu_isa import amx_tiles, bf16_gemm, f32_gemm

        on, what = bf16_gemm(load=False)
        amx_on, amx_what = amx_tiles(load=False)
        return (
            "fused tiled kernels compiled by Numba (FlashAttention-2 forward/backward, block sparsity); "
            f"float32 tiles: {f32_gemm(load=False)[1]}; "
            f"float32 score products: {f32_products_path(load=False)[1]}; "
            f"bfloat16: {what if on else what.replace('float32 fallback', 'float32 compute')}"
            f"{'; bfloat16 forward: ' + amx_what if on else ''}; "
            + cpu_small.RULE
        )

    def available(self) -> tuple[bool, str]:
        try:
            import numba  # noqa: F401
            import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot calls this BLAS)
            _blas.import_threadpoolctl()
        except ImportError as exc:
            return False, f"needs numba, scipy and threadpoolctl: {exc}"
        return True, self.description

    def unsupported_reasons(self, call: AttentionCall) -> list[str]:
        unknown = sorted(set(call.extras) - set(EXTRAS))
        if unknown:
            return [f"does not take {', '.join(unknown)} (it takes {', '.join(EXTRAS)})"]
        return []

    def forward(self, call: AttentionCall):
        # The size rule (shown by `dotattn info`): small calls take the one-block kernel.
        # Non-finite inputs and overflowing scores follow the NaN policy in the general path.
        if not cpu_small.unsupported_reasons(call):
            results = cpu_small.forward(call)
            if results is not None:
                return results
        return forward(call)

    def forward_final(self, call: AttentionCall):
        """:meth:`forward` for an output that goes to the caller as it is (``dispatch.run_forward``'s
        ``final``): bfloat16 calls get their output as bfloat16, written by the kernel."""
        if not cpu_small.unsupported_reasons(call):
            results = cpu_small.forward(call)
            if results is not None:
                return results
        return forward(call, final=True)

    def forward_plan(self, call: AttentionCall):
        """``forward`` for repeated calls of ``call``'s kind (``dotattn.dispatch`` keeps it):
        the size rule decided once, and the small-call kernel's set-up made once.  Plans serve
        ``dotattn.attention``'s callers only (no merge follows): :meth:`forward_final`'s output."""
        if cpu_small.unsupported_reasons(call):
            return self.forward_final
        small = cpu_small.SmallForward(call)

        def run(call: AttentionCall):
            results = small(call)
            return forward(call, final=True) if results is None else results

        return run

    # a gradient through the LSE goes to the kernels as it is (dispatch.run_backward): where
    # they form Δ from their own P, a folded O would not reach it
    takes_dlse = True

    def backward(self, call, out, lse, dout, want_dbias=False, dlse=None):
        return backward(call, out, lse, dout, want_dbias, dlse=dlse)

    def backward_final(self, call, out, lse, dout, want_dbias=False, dlse=None):
        """:meth:`backward` for gradients that go to the caller as they are: bfloat16 calls get
        bfloat16 gradients (:func:`backward_final`)."""
        return backward_final(call, out, lse, dout, want_dbias, dlse=dlse)

    def weights(self, call: AttentionCall, lse: np.ndarray) -> np.ndarray:
        return weights(call, lse)


# =================================================================================
# compiling at install time
# =================================================================================

PRECOMPILE_DTYPES = ("float32", "bfloat16", "float64")


def precompile(dtypes=PRECOMPILE_DTYPES, progress=None) -> list[tuple[str, float]]:
    """Compile (or load) the default kernels for ``dtypes`` into the package's kernel cache.

    One specialization per dtype serves every call (plain, causal, windows, masks, …: the
    options travel as values), so per dtype a forward, a backward and a weights call of the
    general kernels, a forward of the small-call kernel (``cpu_small``: the first call of most
    programs is small) and a decode step (``cpu_decode``) cover them.  The backward runs twice:
    as the prange kernel and as its one chunk called directly (what small backward passes
    run); the forward and weights also as their one-thread entries (what a process forked from
    one whose Numba team ran takes: ``_forked``).  The float32 row also compiles the grouped GQA forward and the models' element-wise kernels.  Decode rows are per cache dtype: ``bfloat16`` also runs a float16 cache (both are
    read as 16-bit words: one machine code).  Returns ``(what, seconds)`` rows; ``progress(what, seconds)`` is called after each.
    The bfloat16 row runs the bfloat16-instruction path where this machine has it (else
    the float32 kernels, which the float32 row compiles).
    """
    from .. import semantics

    rows = []
    rng = np.random.default_rng(0)

    def timed(what, run):
        started = time.perf_counter()
        run()
        rows.append((what, time.perf_counter() - started))
        if progress is not None:
            progress(*rows[-1])

    for name in dtypes:
        dtype = BFLOAT16 if name == "bfloat16" else np.dtype(name)
        q = rng.standard_normal((1, 2, 40, 8), dtype=np.float32).astype(dtype)
        call = semantics.normalize(q, q, q, causal=True)
        results = {}
        timed(f"forward {name}", lambda: results.update(zip(("out", "lse"), forward(call))))
        if name == "bfloat16":  # the output rounded by the kernel (dotattn.attention's route),
            # and V packed transposed from whole key tiles (_cpu_amx.pack_vt)
            whole = semantics.normalize(q[:, :, :32], q[:, :, :32], q[:, :, :32])
            timed("forward bfloat16 (bfloat16 output)", lambda: forward(whole, block_size=(32, 32), final=True))
        for serial in (True, False):  # small passes run the chunk on the caller's thread, others the team
            timed(f"backward {name}{' (one thread)' if serial else ''}",
                  lambda: backward(call, results["out"], results["lse"], results["out"], serial=serial))
        if name == "bfloat16":  # the gradients rounded by a compiled pass (dotattn's front ends' route)
            timed("backward bfloat16 (bfloat16 gradients)",
                  lambda: backward_final(call, results["out"], results["lse"], results["out"]))
        timed(f"weights {name}", lambda: weights(call, results["lse"]))
        _entries.one_thread = True  # the entries a process forked from one whose team ran takes (_forked)
        try:
            timed(f"forward and weights {name} (one thread: forked processes)",
                  lambda: (forward(call), weights(call, results["lse"])))
        finally:
            _entries.one_thread = False
        timed(f"small forward {name}", lambda: cpu_small.forward(call))  # 40·40 scores: under the small-call rule
        timed(f"small forward {name}, partner entries", cpu_small.precompile_partner_entries)
        if name == "float32":  # GQA causal: the grouped forward (float32 storage only)
            gqa = semantics.normalize(q, q[:, :1], q[:, :1], causal=True)
            timed("grouped forward float32", lambda: forward(gqa, grouped=True))
        if name == "float32" and f32_products_path()[0]:  # the split-AMX route's operand passes
            big = rng.standard_normal((1, 1, 260, 32), dtype=np.float32)  # over the small-call rule
            split_call = semantics.normalize(big, big, big)
            timed("float32 split-AMX operands", lambda: _with_split_operands(prepare(split_call, split=True), split_call, big))
        for cache_dtype in ("bfloat16", "float16") if name == "bfloat16" else (name,):
            timed(f"decode {cache_dtype} cache", lambda: _decode_step(cache_dtype, rng))
        if name == "float32":
            timed("model steps (RMSNorm, RoPE, SwiGLU, GEMV, block GEMV, column GEMM, AMX block GEMM)", _model_steps)
    return rows


def _model_steps() -> None:
    """The ``dotattn.models`` kernels once each, on a few float32 rows: the element-wise
    steps, the decode steps' matrix–vector product and the short prompt passes' column-chunk
    GEMM (their parallel and one-thread entries)."""
    from . import _cpu_model_ops as ops

    x = np.ones((2, 8), np.float32)
    ops.add_rms_norm(x, x.copy(), False, np.ones(8, np.float32), np.float32(1e-5), np.empty_like(x), 0, 1)
    table = np.ones((4, 8), np.float32)
    ops.rope(np.ones((2, 24), np.float32), np.arange(2, dtype=np.int64), table, table, np.empty((2, 2, 8), np.float32), 0, 1)
    ops.swiglu(np.ones((2, 16), np.float32), np.empty((2, 8), np.float32), 0, 1)
    w, y = np.ones((6, 8), np.float32), np.empty((2, 6), np.float32)
    ops.gemv(x, w, y, 2)
    ops.gemv_rows(x, w, y, 0, 6)
    # the same on block-coded weights (models/_block_weights.py): finding the codes, the products
    xb, wb = np.ones((2, ops.BLOCK), np.float32), np.ones((6, ops.BLOCK), np.float32)
    codes, scale, offset = np.empty((6, ops.BLOCK), np.int8), np.empty((6, 1), np.float32), np.empty((6, 1), np.float32)
    ops.block_codes(wb, 15, False, codes, scale, offset, np.zeros(1, np.int64), 0, 1)
    sums = np.empty((2, 1), np.float32)
    ops.block_sums(xb, sums)
    ops.gemv_blocks(xb, sums, codes, scale, offset, True, y, 2)
    ops.gemv_blocks_rows(xb, sums, codes, scale, offset, True, y, 0, 6)
    ops.gemm_blocks(xb, codes, scale, offset, True, y, 2)  # decode steps of several sequences
    ops.gemm_blocks_rows(xb, codes, scale, offset, True, y, 0, 6)
    if f32_gemm_path()[0]:  # a short prompt pass's column-chunk products (MKL's sgemm only: smollm._mkl_team)
        ops.gemm_columns(x, w, y, 2)
        ops.gemm_columns_rows(x, w, y, 0, 2, 2)
    if amx_path()[0]:  # a long prompt pass's products on AMX from the block codes (smollm._amx_products)
        from ._cpu_amx_f32 import pieces_buffer

        pairs = np.empty((1, ops.BLOCK, ops.PAIRS_COLS), np.uint32)
        ops.block_pairs(np.ones((ops.PAIRS_COLS, 2 * ops.BLOCK), np.int8), pairs)
        pieces, psums, top = pieces_buffer(32, 2 * ops.BLOCK, np.empty(0, np.uint16)), np.empty((32, 2), np.float32), np.empty(1, np.uint32)
        for xr in (np.ones((3, 2 * ops.BLOCK), np.float32), np.ones((3, 4 * ops.BLOCK), np.float32)[:, : 2 * ops.BLOCK]):
            ops.split_rows_sums(xr, pieces, psums, top, 0, 1)  # token rows contiguous or row-strided
        st = np.ones((2, ops.PAIRS_COLS), np.float32)
        for out in (np.empty((3, ops.PAIRS_COLS), np.float32), np.empty((3, 2 * ops.PAIRS_COLS), np.float32)[:, : ops.PAIRS_COLS]):
            ops.gemm_pairs(pieces, psums, pairs, st, st, True, out, 0, 1)
    ops.precompile_chunk_entries()  # the chunked steps on the spinning partners (smollm._steps_in_chunks)


def _decode_step(cache_dtype: str, rng: np.random.Generator) -> None:
    """A small decode step on a ``cache_dtype`` cache (q float32, or float64 for float64), through
    both of the kernel's paths."""
    from ..decode_semantics import SPLIT_SIZE as SPLIT
    from ..decode_semantics import normalize
    from . import cpu_decode

    dtype = BFLOAT16 if cache_dtype == "bfloat16" else np.dtype(cache_dtype)
    q_dtype = np.float64 if dtype == np.float64 else np.float32
    q = rng.standard_normal((1, 2, 1, 8)).astype(q_dtype)
    cache = rng.standard_normal((1, 1, 40, 8)).astype(dtype)
    new = rng.standard_normal((1, 1, 1, 8)).astype(dtype)
    call = normalize(
        q, cache, cache.copy(), new, new, cache_lengths=np.array([20]), block_table=None, causal=True,
        window=None, scale=None, softcap=None, alibi_slopes=None, rotary=None, layout="bhld",
    )
    cpu_decode.decode(call)  # a small call: the one-entry serial kernel
    # a larger one: plan, items (here on this thread or the pool) and merges
    cpu_decode.decode(call, parallel_min_bytes=0)
    # parallel items on Numba's team (SmolLM's decode steps): a call of several items, whose
    # size class's first call runs in parallel
    long_cache = rng.standard_normal((1, 1, 2 * SPLIT + 40, 8)).astype(dtype)
    long_call = normalize(
        q, long_cache, long_cache.copy(), new, new, cache_lengths=np.array([2 * SPLIT + 20]), block_table=None,
        causal=True, window=None, scale=None, softcap=None, alibi_slopes=None, rotary=None, layout="bhld",
    )
    with cpu_decode.on_numba_team():
        cpu_decode.decode(long_call, parallel_min_bytes=0)
    # and on the calling thread with the spinning partner threads (a size class's first call
    # runs in parallel; one core: alone), and the partners' own entries
    cpu_decode.decode(long_call, parallel_min_bytes=0)
    cpu_decode.precompile_partners()
    if dtype == np.float16:  # a float16 call's casts of q and of the output (q is float32 above)
        cpu_decode.K.float_from_half_scaled(np.zeros(1, np.uint16), np.float32(1.0), np.zeros(1, np.float32))
        cpu_decode.K.half_from_float(np.zeros(1, np.float32), np.zeros(1, np.uint16))
