"""Fused element-wise steps of a Llama block on float32 token rows (``dotattn.models``), and
the matrix–vector products of its decode steps (:func:`gemv`, at the end).

RMSNorm with its residual add, rotate-half RoPE and SwiGLU, each one pass over its rows.
Written as NumPy operations they were 5–7 passes each over arrays of the prompt's size
(``B·L × hidden``), which at 4,096 tokens no longer fit in the caches: 1.4 s of a 7.5 s
prompt pass, as much as half the GEMMs' time.  Every kernel takes ``(chunk, chunks)`` and
works on rows ``[N·chunk/chunks, N·(chunk+1)/chunks)``, releasing the GIL, so
:func:`dotattn.kernels._launch.run_chunks` runs the chunks of one step side by side.

The arithmetic is float32 throughout, as in ``transformers``: sums of squares accumulate in
float32 (vector lanes), the divisions stay divisions, and SiLU's exponential is the attention
kernels' float32 ``2**x`` (``_cpu_primitives._exp2_one``: relative error ≤ 2.2e-7, 0 below 2**−126).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from ._cpu_cache import install_locator
from ._cpu_primitives import LOG2E, _exp2_one

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

_JIT_CACHE = True
_FAST = {"nsz", "contract", "reassoc"}  # vector lanes for the sums; no approximate division
# error_model="numpy" on every kernel: with Python's (the default), each division tests its
# divisor for zero to raise ZeroDivisionError, and that branch kept LLVM from vectorizing
# any loop with a division in it (SwiGLU ran 2× slower than NumPy's seven passes).


@njit(cache=_JIT_CACHE, inline="always")
def _rows(n, chunk, chunks):
    return n * chunk // chunks, n * (chunk + 1) // chunks


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def add_rms_norm(x, proj, add, weight, eps, h, chunk, chunks):
    """Rows of ``x (N, E)``: ``x += proj`` (when ``add``: the pending residual), then
    ``h = x / sqrt(mean(x²) + eps) · weight``."""
    N, E = x.shape
    r0, r1 = _rows(N, chunk, chunks)
    for i in range(r0, r1):
        xi, hi = x[i], h[i]
        if add:
            pi = proj[i]
            for j in range(E):
                xi[j] += pi[j]
        ss = np.float32(0.0)
        for j in range(E):
            ss += xi[j] * xi[j]
        rms = np.sqrt(ss / np.float32(E) + eps)
        for j in range(E):
            hi[j] = xi[j] / rms * weight[j]


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def rope(qkv, positions, cos, sin, out, chunk, chunks):
    """Rows of ``qkv (N, ≥ H·D)``: its first ``H`` heads rotated into ``out (N, H, D)``.

    Rotate-half RoPE: ``[x1·cos − x2·sin, x2·cos + x1·sin]`` with ``x1, x2`` a head's two
    halves and ``cos``/``sin`` the tables' rows ``(positions, ≥ D/2)`` at the row's position
    ``positions[i]`` (the tables' two halves are equal; the first is read).
    """
    N, H, D = out.shape
    half = D // 2
    r0, r1 = _rows(N, chunk, chunks)
    for i in range(r0, r1):
        src, c, s = qkv[i], cos[positions[i]], sin[positions[i]]
        for hh in range(H):
            dst = out[i, hh]
            base = hh * D
            for j in range(half):
                x1, x2 = src[base + j], src[base + half + j]
                dst[j] = x1 * c[j] - x2 * s[j]
                dst[half + j] = x2 * c[j] + x1 * s[j]


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def swiglu(gate_up, act, chunk, chunks):
    """Rows of ``gate_up (N, 2F)`` = ``[gate | up]``: ``act (N, F) = silu(gate) · up``.

    ``silu(g) = g · sigmoid(g)`` with ``sigmoid(g) = 1/(1 + e)`` for ``g ≥ 0`` and
    ``e/(1 + e)`` for ``g < 0``, ``e = e**−|g|``: the exponential only ever sees arguments
    ≤ 0, so nothing overflows (a very negative gate gives 0, SiLU's limit).
    """
    N, F = act.shape
    r0, r1 = _rows(N, chunk, chunks)
    one, log2e, zero = np.float32(1.0), np.float32(LOG2E), np.float32(0.0)
    for i in range(r0, r1):
        gu, a = gate_up[i], act[i]
        for j in range(F):
            g = gu[j]
            e = _exp2_one(-abs(g), log2e, zero)  # e**−|g| = 2**(−|g|·log2 e): the kernels' exp
            num = one if g >= 0 else e
            a[j] = g * (num / (one + e)) * gu[F + j]


# ---- matrix–vector products of a decode step ------------------------------------------------
# A decode step multiplies a few token rows by every weight matrix once: ≈ 2 FLOPs per 4-byte
# weight read, so its time is the time to stream the weights from memory.  MKL's GEMM with
# one row (torch.mm) streamed them at ≈ 11–18 GB/s on both cores here; these loops read them
# in order, four weight rows at a time (each x element loaded once per four FMAs), with the
# row range split into one chunk per thread of a Numba prange team.  A team, not Python pool
# threads taking row blocks from a shared counter (the attention kernels' way): a product
# here lasts 0.1–0.3 ms, and a pool thread woken per product started too late to help — in
# the model at 512 tokens (load 1.2–1.5) the pool version decoded at 20.8 tok/s, the team
# at 30.5, torch.mm at 23.7.  The team's known cost, a launch that waits for a descheduled
# thread on a busy machine, is what smollm._StepThreads' one-thread mode is for.
GEMV_ROW_BLOCK = 4


@njit(cache=_JIT_CACHE, nogil=True, fastmath=_FAST, error_model="numpy")
def gemv_rows(x, w, out, r0, r1):
    """``out[b, o] = Σ_i x[b, i] · w[o, i]`` for output rows ``o ∈ [r0, r1)``: ``x (B, I)``,
    ``w (O, I)`` row-major (a linear layer's ``(out, in)`` weight), ``out (B, O)``.

    Float32 sums over ``i`` in vector lanes (reassociated, as any BLAS does); NaN and inf
    propagate as in a product (no ``nnan``/``ninf`` flags).
    """
    B, I = x.shape
    o = r0
    while o + GEMV_ROW_BLOCK <= r1:
        w0, w1, w2, w3 = w[o], w[o + 1], w[o + 2], w[o + 3]
        for b in range(B):
            xb = x[b]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for i in range(I):
                xi = xb[i]
                a0 += w0[i] * xi
                a1 += w1[i] * xi
                a2 += w2[i] * xi
                a3 += w3[i] * xi
            ob = out[b]
            ob[o] = a0
            ob[o + 1] = a1
            ob[o + 2] = a2
            ob[o + 3] = a3
        o += GEMV_ROW_BLOCK
    while o < r1:  # the last rows of an O that is not a multiple of the block
        wo = w[o]
        for b in range(B):
            xb = x[b]
            acc = np.float32(0.0)
            for i in range(I):
                acc += wo[i] * xb[i]
            out[b, o] = acc
        o += 1


@njit(cache=_JIT_CACHE, inline="always")
def _block_rows(n, chunk, chunks):
    """Rows ``[r0, r1)`` of chunk ``chunk``: boundaries on multiples of the row block."""
    blocks = (n + GEMV_ROW_BLOCK - 1) // GEMV_ROW_BLOCK
    return min(n, blocks * chunk // chunks * GEMV_ROW_BLOCK), min(n, blocks * (chunk + 1) // chunks * GEMV_ROW_BLOCK)


@njit(cache=_JIT_CACHE, parallel=True, fastmath=_FAST, error_model="numpy")
def gemv(x, w, out, chunks):
    """:func:`gemv_rows` over all of ``w``'s rows in ``chunks`` chunks, one per thread of
    Numba's team (the caller passes ``numba.get_num_threads()``: read inside the kernel it
    would keep Numba from caching the machine code).  With one thread, call
    :func:`gemv_rows` directly: no parallel launch."""
    O = w.shape[0]
    for c in numba.prange(chunks):
        r0, r1 = _block_rows(O, c, chunks)
        gemv_rows(x, w, out, r0, r1)
