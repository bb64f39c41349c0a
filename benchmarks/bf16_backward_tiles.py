"""Per-tile go/no-go (issue 13 §1): the bfloat16 backward's Sᵀ = K·Qᵀ / dPᵀ = V·dOᵀ on MKL's
cblas_gemm_bf16bf16f32 (as ``_backward_chunk`` calls it) against our AMX tile product
(``_cpu_amx.scores``) with the query tile packed into pairs per tile (``pack_q_rows``).
One thread, 256 × 256 tiles, alternated in one process, medians.

    PYTHONPATH=src python benchmarks/bf16_backward_tiles.py [--rounds 15]
"""

import argparse
import time

import numpy as np
from numba import njit

from dotattn.kernels import cpu
from dotattn.kernels._cpu_isa import amx_tiles, bf16_gemm

ok, why = bf16_gemm()
assert ok, why
assert amx_tiles()[0]
from dotattn.kernels._cpu_amx import ROW_PAD, pack_q_rows, scores, tile_config  # noqa: E402
from dotattn.kernels._cpu_primitives import _aligned_empty, _gemm_bf16  # noqa: E402


@njit
def mkl_loop(kp, q, ST, reps):
    nkb, BK = kp.shape[2], kp.shape[3]
    BQ = ST.shape[1]
    nqb = q.shape[2] // BQ
    for _ in range(reps):
        for kb in range(nkb):
            Kb = kp[0, 0, kb]
            for qb in range(nqb):
                Qt = q[0, 0, qb * BQ : (qb + 1) * BQ]
                _gemm_bf16(Kb, Qt.T, ST, 0.0)


@njit
def amx_loop(kp, q, ST, Qv, reps, pack):
    nkb, BK, D = kp.shape[2], kp.shape[3], kp.shape[4]
    BQ = ST.shape[1]
    nqb = q.shape[2] // BQ
    cfg = tile_config()
    q32 = q.view(np.uint32)
    for _ in range(reps):
        for kb in range(nkb):
            Kb = kp[0, 0, kb]
            for qb in range(nqb):
                if pack:
                    pack_q_rows(q32, 0, 0, qb * BQ, BQ, Qv)
                scores(Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], BQ, ST.ctypes.data, ST.strides[0], cfg)


@njit
def amx_head_loop(kp, Qh, ST, reps):
    """Q packed once per head: Qh (D/2, Lq + pad) uint32, the tile's columns read in place."""
    nkb, BK, D = kp.shape[2], kp.shape[3], kp.shape[4]
    BQ = ST.shape[1]
    nqb = Qh.shape[1] // BQ
    cfg = tile_config()
    for _ in range(reps):
        for kb in range(nkb):
            Kb = kp[0, 0, kb]
            for qb in range(nqb):
                scores(Kb.ctypes.data, Kb.strides[0], BK, D, Qh.ctypes.data + 4 * qb * BQ, Qh.strides[0], BQ, ST.ctypes.data, ST.strides[0], cfg)


@njit
def pack_loop(q, Qv, reps):
    BQ = Qv.shape[1]
    nqb = q.shape[2] // BQ
    q32 = q.view(np.uint32)
    for _ in range(reps):
        for qb in range(nqb):
            pack_q_rows(q32, 0, 0, qb * BQ, BQ, Qv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--L", type=int, default=1024)
    a = ap.parse_args()
    BQ, BK = cpu.BF16_BACKWARD_BLOCK_SIZE
    rng = np.random.default_rng(0)
    for D in (64, 128):
        L = a.L
        bits = lambda shape: (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        kp = cpu._empty_aligned((1, 1, L // BK, BK, D), np.uint16)
        kp[:] = bits(kp.shape)
        q = cpu._empty_aligned((1, 1, L, D), np.uint16)
        q[:] = bits(q.shape)
        ST = _aligned_empty(BK, BQ, np.empty(0, np.float32))  # the backward's ST (no row pad)
        pad = ROW_PAD // 4
        Qv = _aligned_empty(D // 2, BQ + pad, np.empty(0, np.uint32))[:, :BQ]
        Qh = _aligned_empty(D // 2, L + pad, np.empty(0, np.uint32))[:, :L]
        Qh[:] = q.view(np.uint32)[0, 0].T
        STp = _aligned_empty(BK, BQ + pad, np.empty(0, np.float32))[:, :BQ]
        # correctness
        ref = np.empty((BK, BQ), np.float32)
        mkl_loop(kp[:, :, :1], q[:, :, :BQ], ref, 1)
        amx_loop(kp[:, :, :1], q[:, :, :BQ], ST, Qv, 1, True)
        err = float(np.max(np.abs(ST - ref)) / np.max(np.abs(ref)))
        pack_loop(q, Qv, 1)
        tiles = (L // BK) * (L // BQ)
        reps = max(1, 400 // tiles)
        t = {k: [] for k in ("mkl", "amx+pack", "amx+pack padST", "amx only", "amx only padST", "amx head-packed", "pack only", "head pack np")}
        for r in range(a.rounds):
            order = list(t)
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                if k == "mkl":
                    mkl_loop(kp, q, ST, reps)
                elif k == "amx+pack":
                    amx_loop(kp, q, ST, Qv, reps, True)
                elif k == "amx+pack padST":
                    amx_loop(kp, q, STp, Qv, reps, True)
                elif k == "amx only padST":
                    amx_loop(kp, q, STp, Qv, reps, False)
                elif k == "amx head-packed":
                    amx_head_loop(kp, Qh, ST, reps)
                elif k == "head pack np":
                    for _ in range(reps):
                        Qh[:] = q.view(np.uint32)[0, 0].T
                    t[k].append((time.perf_counter() - t0) / (reps * (L // BQ)) * 1e6)
                    continue
                elif k == "amx only":
                    amx_loop(kp, q, ST, Qv, reps, False)
                else:
                    pack_loop(q, Qv, reps * (L // BK))
                    t[k].append((time.perf_counter() - t0) / (reps * tiles) * 1e6)
                    continue
                t[k].append((time.perf_counter() - t0) / (reps * tiles) * 1e6)
        print(f"D {D} BQ {BQ} BK {BK} (rel. diff AMX vs MKL {err:.1e}); µs per 256×256 tile (packs: per 256-row query tile), medians of {a.rounds} (min–max):")
        for k, v in t.items():
            print(f"  {k:18s} {np.median(v):7.2f}  ({min(v):.2f}–{max(v):.2f})")


if __name__ == "__main__":
    main()
