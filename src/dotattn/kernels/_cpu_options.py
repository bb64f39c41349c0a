"""The per-call options of the ``cpu`` kernels, as one structure (no Numba import here).

Defined outside the kernel template (``_cpu_kernels.py``) so that the kernel copies made for
user functions share the type, and outside ``_cpu_primitives.py`` so that preparing a call
imports no JIT compiler.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2  # tile classes: never read / masked per element / fully visible

# Placeholders for the split-AMX float32 operands (Options.kpc …) when the route is off: one
# array type for every call, so every call reuses one compiled specialization.
NO_ROWS = np.zeros((1, 1, 1, 3, 1, 1), dtype=np.uint16)
NO_PAIRS = np.zeros((1, 1, 3, 1, 1), dtype=np.uint32)
NO_ROWS_STRIDED = np.zeros((1, 1, 1, 3, 1, 2), dtype=np.uint16)[..., :1]  # (Numba layout "A", as ktp)


class Options(NamedTuple):
    """Everything of one call the kernels read besides q/K/V and the outputs (one value each).

    Built once by ``cpu.prepare``; Numba sees a named tuple of one type for every call of a
    dtype, so every call reuses one compiled specialization.
    """

    BQ: int  # query rows per tile (the key tile BK is the packed K/V's block)
    Lq: int
    Lk: int
    q_lens: np.ndarray  # (B,) int64 real lengths
    kv_lens: np.ndarray
    scale: float
    softcap: float  # 0 = off
    bias: np.ndarray  # compact data, flattened; element strides in bstr
    bstr: np.ndarray
    has_bias: bool
    slopes: np.ndarray  # (B or 1, Hq) ALiBi
    has_alibi: bool
    mask: np.ndarray  # uint8, compact data, flattened; element strides in mstr
    mstr: np.ndarray
    has_dense_mask: bool
    causal: int  # 0 none, 1 bottom-right, 2 top-left
    left: int  # window sides, < 0 = unbounded
    right: int
    q_seg: np.ndarray  # (B, Lq) int64 segment ids
    kv_seg: np.ndarray
    has_seg: bool
    shift: int  # a block's position shift (semantics.BlockGeometry): added to bottom-right/window/ALiBi offsets
    top_left_offset: int  # top-left causal: query i sees keys j ≤ i + top_left_offset
    dropout_p: float
    dropout_key: np.uint64
    dropout_geom: np.ndarray  # int64 (h0, row0, col0, Hq, Lq, Lk): the full problem's dropout counters
    bm: np.ndarray  # (Bm, Hm, nqb, nkb) int8 classes of the user's block mask
    bm_on: bool
    amx: bool = False  # bfloat16 forward: tile products on AMX (_cpu_amx), P in key pairs, accᵀ
    # bfloat16 backward: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ on AMX (_cpu_amx.scores) from q's and dO's
    # rows packed once per call in pairs, transposed (qv, dov (B, Hq, 1, D/2, ≥Lq) uint32,
    # _cpu_amx.pack_pairs_t; cpu.bf16_backward_amx)
    bwd_amx: bool = False
    qv: np.ndarray = NO_PAIRS
    dov: np.ndarray = NO_PAIRS
    # ... and dV += P̃ᵀ·dO, dK += dS·Q: dO's and q's rows in pairs (dorows, qrows (B, Hq, 1,
    # ≥Lq/2, X) uint32, _cpu_amx.pack_row_pairs)
    qrows: np.ndarray = NO_PAIRS
    dorows: np.ndarray = NO_PAIRS
    # float32 on AMX as split bfloat16 products (_cpu_amx_f32; cpu.f32_split_route): the score
    # product Sᵀ = K·Qᵀ (forward and backward alike: the backward's P = 2^(S − lse) needs the
    # forward's scores bit for bit) from K's pieces per key tile (kpc (B, Hkv, nkb, 3, ≥BK, Dp)
    # uint16) and Qᵀ's per head (qpc (B, Hq, 3, Dp/2, ≥Lq) uint32); the backward's dPᵀ = V·dOᵀ
    # likewise from vpc and dopc
    split_s: bool = False
    split_dp: bool = False
    kpc: np.ndarray = NO_ROWS
    qpc: np.ndarray = NO_PAIRS
    vpc: np.ndarray = NO_ROWS
    dopc: np.ndarray = NO_PAIRS
    # the pieces a task alone reads written by that task (on the kernel's threads, hot for its
    # products), not by a pass per call: the forward's Qᵀ pieces of its query tile (qpc), the
    # backward's K and V pieces of its key tile (kpc, vpc)
    split_in_task: bool = False
    # the forward's PARTIAL tiles whose rows see very different keys (causal diagonals) in
    # query strips of this many rows, each with its own keys (_cpu_kernels._tile_in_strips);
    # 0: whole tiles.  Set on the split route (cpu.SPLIT_STRIP_ROWS)
    strip_rows: int = 0
    # ... and the backward's other three products (dV += Pᵀ·dO, dK += dSᵀ·Q, dQᵀ += Kᵀ·dSᵀ): P's
    # and dS's pieces from the exp and dS passes, Q's and dO's in pairs of query rows per head
    # (qrp, dorp (B, Hq, 3, ≥Lq/2, Dp) uint32), Kᵀ's rows per key tile (ktp (B, Hkv, nkb, 3,
    # ≥Dp, BK) uint16, rows padded: a strided view); dQ then accumulates transposed
    split_all: bool = False
    qrp: np.ndarray = NO_PAIRS
    dorp: np.ndarray = NO_PAIRS
    ktp: np.ndarray = NO_ROWS_STRIDED
    # ... and the forward's acc += P·V as (Vᵀ·P)ᵀ: Vᵀ's rows per key tile (vtp, as ktp) times
    # P's pieces in key pairs, split from each tile's P after its exp pass
    # (_cpu_kernels._split_pv, _cpu_amx_f32.product_add_t)
    split_pv: bool = False
    vtp: np.ndarray = NO_ROWS_STRIDED


def flat_pairwise(x: np.ndarray | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A (B, Hq, Lq, Lk) (broadcast) view → its compact data flattened + element strides.

    Broadcast axes keep stride 0, so a ``(Lq, Lk)`` bias shared by all heads is read, never
    copied ``B·Hq`` times.
    """
    if x is None:
        return np.zeros(1, dtype=dtype), np.zeros(4, dtype=np.int64)
    index = tuple(slice(0, 1) if st == 0 else slice(None) for st in x.strides)
    compact = np.array(x[index], dtype=dtype, order="C", copy=True)
    strides = np.array(
        [0 if x.strides[a] == 0 else compact.strides[a] // compact.itemsize for a in range(4)], dtype=np.int64
    )
    return compact.reshape(-1), strides
