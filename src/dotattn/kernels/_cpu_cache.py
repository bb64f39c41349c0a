"""Where the ``cpu`` kernels' machine code lives: beside the package, compiled once at install.

Numba compiles the kernels in ≈ 35 s (forward + backward); from its disk cache they load in
≈ 0.4 s.  Numba's default cache follows ``NUMBA_CACHE_DIR`` (or the user's cache), which a
fresh environment has empty.  The kernels of :data:`KERNEL_FILES` (general, small-call and
decode) are therefore cached in the package's own ``kernels/_precompiled/`` directory,
whatever ``NUMBA_CACHE_DIR`` says: ``dotattn precompile`` (run by ``make install``) fills it, and
every later process — fresh caches or not — loads from it.  Each entry is keyed by the
content hash of all the kernels' source files (:data:`SOURCE_FILES`: they inline each
other's helpers), the signature and the CPU, so an edited kernel or helper, or another CPU,
compiles again (and adds its entry) instead of loading stale code.

A read-only package directory (a system-wide install used by another user, a container's
read-only root): its entries are copied once into a writable directory of the user's
(:func:`cache_dir`: ``$DOTATTN_CACHE_DIR/precompiled/…``, else ``$XDG_CACHE_HOME/dotattn/…``
or ``~/.cache/dotattn/…``), which takes the new entries too; with no writable directory at all,
the package's entries are read in place and a kernel compiled anew runs from memory (a
:class:`KernelCacheWarning` says so).  Until 6 Dec 2026 a read-only package directory was
skipped — every kernel compiled again (a first call of 150 s instead of 1) — and with no
writable cache anywhere every call failed with Numba's "no locator available".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from numba.core import caching

# DOTATTN_PRECOMPILED_DIR moves it (benchmarks/cpu_first_call.py times a compile from scratch so).
PRECOMPILED_DIR = Path(os.environ.get("DOTATTN_PRECOMPILED_DIR") or Path(__file__).resolve().with_name("_precompiled"))
# The files whose functions are cached there — the general, small-call and decode kernels and
# the models' element-wise steps —
# (generated kernel copies for user functions live in dotattn's user cache, see
# cpu.user_kernel_dir).
KERNEL_FILES = (
    "_cpu_kernels.py", "_cpu_primitives.py", "_cpu_small_kernels.py", "_cpu_decode_kernels.py", "_cpu_model_ops.py",
    "_cpu_amx.py", "_cpu_amx_f32.py", "_cpu_sync.py",
)


# What the compiled kernels are made of: the kernel files, and the modules whose jitted helpers
# and constants they inline (the dropout hash, the option codes, the bfloat16 GEMM symbols,
# the 16-lane loops written as LLVM IR).
SOURCE_FILES = KERNEL_FILES + ("_cpu_options.py", "_cpu_isa.py", "_cpu_simd.py", "dropout.py")


@functools.lru_cache(maxsize=None)
def _sources_hash(stamps: tuple) -> bytes:
    digest = hashlib.sha256()
    for path, _mtime, _size in stamps:
        digest.update(Path(path).read_bytes())
    return digest.digest()


def sources_stamp(directory: Path | None = None) -> bytes:
    """One hash of every file in :data:`SOURCE_FILES` (re-read when one changes on disk)."""
    here = Path(directory) if directory is not None else Path(__file__).resolve().parent
    stamps = []
    for name in SOURCE_FILES:
        st = os.stat(here / name)
        stamps.append((str(here / name), st.st_mtime, st.st_size))
    return _sources_hash(tuple(stamps))


class KernelCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """A Numba cache locator for the kernel files above: ``kernels/_precompiled/``.

    Numba keys an entry by its own source file's hash; these kernels inline helpers from
    ``_cpu_primitives.py`` and others, so an edit there left every caller's cached machine
    code stale (a fix to the shared exp did not reach the kernels).  Entries here are keyed
    by all of :data:`SOURCE_FILES` instead.
    """

    def get_source_stamp(self):
        return sources_stamp()

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno

    def get_cache_path(self):
        return str(cache_dir())

    @classmethod
    def from_function(cls, py_func, py_file):
        path = Path(py_file).resolve()
        # (the kernel files, and the helpers they compile from the other source files: dropout's hash)
        if path.parent != Path(__file__).resolve().parent or path.name not in SOURCE_FILES:
            return None
        if not cache_dir().is_dir():  # nothing to read and nowhere to write: Numba's locators
            return None
        # (not Numba's writability check: a read-only directory of entries is still read)
        return cls(py_func, str(path))


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
        return True
    except OSError:
        return False


def user_cache_root() -> Path:
    """dotattn's cache in the user's files: ``$DOTATTN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dotattn``, else ``~/.cache/dotattn``."""
    root = os.environ.get("DOTATTN_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dotattn"


@functools.lru_cache(maxsize=None)
def cache_dir() -> Path:
    """The directory the kernels' entries are read from and written to (module docstring):
    :data:`PRECOMPILED_DIR` where it is writable, else a writable copy of it in the user's
    cache (one per package directory and kernel sources), else the read-only directory itself."""
    if _writable(PRECOMPILED_DIR):
        return PRECOMPILED_DIR
    key = hashlib.sha256(str(PRECOMPILED_DIR).encode() + sources_stamp()).hexdigest()[:16]
    try:
        copy = user_cache_root() / "precompiled" / key
    except RuntimeError:  # (no home directory to find)
        return PRECOMPILED_DIR
    if not _writable(copy):
        return PRECOMPILED_DIR
    if PRECOMPILED_DIR.is_dir():
        _copy_entries(PRECOMPILED_DIR, copy)
    lock_saves_under(copy)
    return copy


def _copy_entries(source: Path, target: Path) -> None:
    """Copy the cache entries ``target`` lacks (never one it has: its own saves stay), each
    under a temporary name and renamed, so another process copying too reads whole files."""
    for entry in source.iterdir():
        if entry.name == LOCK_NAME or not entry.is_file() or (target / entry.name).exists():
            continue
        partial = target / f".{entry.name}.{os.getpid()}.partial"
        try:
            shutil.copyfile(entry, partial)
            os.replace(partial, target / entry.name)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink()


def install_locator() -> None:
    """Put :class:`KernelCacheLocator` first; call before the kernel modules define their functions."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in Numba 0.60
    classes = impl._locator_classes
    if not any(c.__name__ == KernelCacheLocator.__name__ for c in classes):
        classes.insert(0, KernelCacheLocator)
    if not getattr(caching.IndexDataCacheFile.save, "dotattn_locked", False):
        caching.IndexDataCacheFile.save = _save_locked(caching.IndexDataCacheFile.save)
    if not getattr(caching.Cache.save_overload, "dotattn_guarded", False):
        caching.Cache.save_overload = _save_or_warn(caching.Cache.save_overload)


class KernelCacheWarning(UserWarning):
    """A compiled kernel ran but could not be saved to dotattn's kernel cache."""


def _save_or_warn(numba_save_overload):
    """Numba's ``Cache.save_overload``, whose failure in dotattn's cache directories is a warning.

    The function has been compiled when Numba saves it; a save that raises (a full disk, or
    Numba's own "no compiled object yet for <Library …>" from serializing a library whose
    object code its JIT had already taken — seen while other processes compiled into the same
    directory) would fail the user's call, after a decode call had appended its tokens.  The
    compiled code runs from memory instead, and the next process compiles again.
    """

    def save_overload(self, sig, data):
        try:
            return numba_save_overload(self, sig, data)
        except Exception as exc:
            if not _locked(self._cache_path):
                raise
            warnings.warn(
                f"dotattn: {self._name} for {sig} was compiled but could not be saved to {self._cache_path} "
                f"({type(exc).__name__}: {exc}); it runs from memory, and the next process compiles it again",
                KernelCacheWarning,
                stacklevel=2,
            )

    save_overload.dotattn_guarded = True
    save_overload.__doc__ = numba_save_overload.__doc__
    return save_overload


# =================================================================================
# several processes writing the directory at once
# =================================================================================

LOCK_NAME = ".save.lock"
# Directories whose Numba caches take turns (any cache path at or below one): the precompiled
# kernels, and dotattn's user-kernel cache once cpu.py writes a kernel copy there.
_LOCKED_ROOTS: set[Path] = {PRECOMPILED_DIR.resolve()}


def lock_saves_under(root: Path) -> None:
    """Make Numba's cache saves at or below ``root`` take turns (see :func:`_save_locked`)."""
    _LOCKED_ROOTS.add(Path(root).resolve())


def _locked(cache_path: str) -> bool:
    path = Path(cache_path).resolve()
    return any(path == root or root in path.parents for root in _LOCKED_ROOTS)


@contextlib.contextmanager
def _exclusive(directory: str):
    """An exclusive ``flock`` on ``directory``'s lock file for the ``with`` body (none where the
    platform has no ``fcntl`` or the lock file cannot be opened: there the save goes unlocked,
    as Numba's own does, rather than failing a compile)."""
    try:
        import fcntl

        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _save_locked(numba_save):
    """Numba's ``IndexDataCacheFile.save`` made safe for processes writing
    :data:`PRECOMPILED_DIR` (or a directory given to :func:`lock_saves_under`) at once
    (``dotattn precompile`` compiles its dtypes in parallel, pytest's workers may compile an
    edited kernel, or one user function's kernel copy for two dtypes, together).

    Numba reads a function's index, picks the first free data file number, writes the index and
    then the data, with no lock: two processes saving two signatures of one function could both
    pick ``….1.nbc``, one index entry would be lost, and the other would name the wrong
    machine code.  Here the whole step holds the directory's lock, and the data file is written
    before the index names it, so a process loading meanwhile never finds a key whose file is
    still missing or another's.  Other directories keep Numba's save."""

    def save(self, key, data):
        if not _locked(self._cache_path):
            return numba_save(self, key, data)
        with _exclusive(self._cache_path):
            overloads = self._load_index()
            name = overloads.get(key)
            if name is None:
                taken = set(overloads.values())
                name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
            self._save_data(name, data)
            if overloads.get(key) != name:
                overloads[key] = name
                self._save_index(overloads)

    save.dotattn_locked = True
    save.__doc__ = numba_save.__doc__
    return save


def uses_precompiled(dispatcher) -> bool:
    """Whether ``dispatcher`` (a cached kernel) reads and writes the kernels' cache,
    :func:`cache_dir` (:data:`PRECOMPILED_DIR`, or its writable copy where that is read-only)."""
    cache = getattr(dispatcher, "_cache", None)
    locator = getattr(getattr(cache, "_impl", None), "locator", None)
    return locator is not None and Path(locator.get_cache_path()).resolve() == cache_dir().resolve()
