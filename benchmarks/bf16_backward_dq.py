"""Per-tile go/no-go (issue 13 §1): the bfloat16 backward's fifth product, dQ += dSᵀ·K, on MKL's
cblas_gemm_bf16bf16f32 (as ``_backward_chunk`` calls it, dQ's rows in place) against our AMX tile
product ``dQᵀ += Kᵀ·dS`` (``_cpu_amx.values``: Kᵀ per key tile by ``_cpu_amx.tile_t``, dS in key
pairs written by the dS pass itself, ``_cpu_amx.ds_pairs``), and the two dS passes
(``_cpu_primitives._ds_bf16``, rows only, against ``_cpu_amx.ds_pairs``, rows and pairs).  One thread, 256 × 256
tiles, a head's tile pairs per round, variants alternated in random order, medians (min–max).
Also checks that the two products give the same bits over a head's key tiles.

    PYTHONPATH=src python benchmarks/bf16_backward_dq.py [--rounds 15] [--L 4096]
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
from dotattn.kernels._cpu_amx import ROW_PAD, ds_pairs, tile_config, tile_t, values  # noqa: E402
from dotattn.kernels._cpu_primitives import _aligned_empty, _ds_bf16, _gemm_bf16  # noqa: E402


@njit
def mkl_loop(kp, Pb, dq, reps):
    nkb = kp.shape[2]
    BQ = Pb.shape[1]
    nqb = dq.shape[0] // BQ
    for _ in range(reps):
        for kb in range(nkb):
            Kb = kp[0, 0, kb]
            for qb in range(nqb):
                _gemm_bf16(Pb.T, Kb, dq[qb * BQ : (qb + 1) * BQ], 1.0)


@njit
def amx_loop(kp, KT, Dp, dqT, reps, transpose):
    nkb, BK, D = kp.shape[2], kp.shape[3], kp.shape[4]
    BQ = Dp.shape[1]
    nqb = dqT.shape[0] // D
    cfg = tile_config()
    KT32 = KT.view(np.uint32)
    for _ in range(reps):
        for kb in range(nkb):
            Kb = kp[0, 0, kb]
            if transpose:
                tile_t(Kb.view(np.uint32), KT32)
            for qb in range(nqb):
                values(KT.ctypes.data, KT.strides[0], D, BK, Dp.ctypes.data, Dp.strides[0], BQ,
                       dqT.ctypes.data + qb * D * dqT.strides[0], dqT.strides[0], cfg)


@njit
def tile_t_loop(kp, KT, reps):
    KT32 = KT.view(np.uint32)
    for _ in range(reps):
        for kb in range(kp.shape[2]):
            tile_t(kp[0, 0, kb].view(np.uint32), KT32)


@njit
def ds_loop(Pb, dPT, delta, Dp, reps, kind):
    BK, BQ = Pb.shape
    for _ in range(reps):
        if kind == 1:
            ds_pairs(Pb.ctypes.data, Pb.strides[0], dPT.ctypes.data, dPT.strides[0], BK, BQ, delta.ctypes.data,
                     Dp.ctypes.data, Dp.strides[0])
        else:
            _ds_bf16(Pb, dPT, delta)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--L", type=int, default=4096)
    a = ap.parse_args()
    BQ, BK = cpu.BF16_BACKWARD_BLOCK_SIZE
    rng = np.random.default_rng(0)
    f32 = np.empty(0, np.float32)
    for D in (64, 128):
        L = a.L
        bits = lambda shape: (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        kp = cpu._empty_aligned((1, 1, L // BK, BK, D), np.uint16)
        kp[:] = bits(kp.shape)
        Pb = _aligned_empty(BK, BQ, np.empty(0, np.uint16))
        Pb[:] = bits(Pb.shape)
        pad = ROW_PAD // 4
        Dp = _aligned_empty(BK // 2, BQ + pad, np.empty(0, np.uint32))[:, :BQ]
        KT = _aligned_empty(D, BK + 2 * pad, np.empty(0, np.uint16))[:, :BK]
        dq = _aligned_empty(L, D, f32)
        dqT = _aligned_empty((L // BQ) * D, BQ + 16, f32)  # the kernel's dQᵀ parts: by query tiles
        dPT = _aligned_empty(BK, BQ, f32)
        delta = rng.standard_normal(BQ).astype(np.float32)
        dPT[:] = delta + np.float32(1.0)  # dS = P exactly: the pass can run again and again
        # bits: the product over all key tiles, both ways, from dS in pairs as the dS pass wrote them
        # the dS passes' bits: random P̃, dPᵀ, Δ (and some zeros, signs, tiny values)
        P0 = Pb.copy()
        P0.reshape(-1)[::97] = 0x8000
        dP0 = rng.standard_normal((BK, BQ)).astype(np.float32) * np.float32(3.0)
        dP0.reshape(-1)[::101] = np.float32(1e-39)
        dPT[:] = dP0
        outs = []
        for kind in (0, 1):
            Pb[:] = P0
            Dp[:] = 0
            ds_loop(Pb, dPT, delta, Dp, 1, kind)
            outs.append((Pb.copy(), Dp.copy()))
        pairs_ref = outs[0][0][0::2].astype(np.uint32) | (outs[0][0][1::2].astype(np.uint32) << 16)
        ds_same = all(np.array_equal(o[0], outs[0][0]) and np.array_equal(o[1], pairs_ref) for o in outs[1:])
        Pb[:] = P0
        dPT[:] = delta + np.float32(1.0)
        ds_loop(Pb, dPT, delta, Dp, 1, 1)
        dq[:] = 0.0
        dqT[:] = 0.0
        mkl_loop(kp, Pb, dq, 1)
        amx_loop(kp, KT, Dp, dqT, 1, True)
        tiled = dqT[:, :BQ].reshape(L // BQ, D, BQ).transpose(0, 2, 1).reshape(L, D)
        same = np.array_equal(dq.view(np.uint32), tiled.view(np.uint32))
        nkb, nqb = L // BK, L // BQ
        tiles = nkb * nqb
        reps = max(1, 256 // tiles)
        t = {k: [] for k in ("mkl dQ", "amx dQT", "amx dQT + tile_t", "tile_t (per key tile)", "ds rows (_ds_bf16)", "ds rows+pairs (ds_pairs)")}
        for _r in range(a.rounds):
            order = list(t)
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                if k == "mkl dQ":
                    mkl_loop(kp, Pb, dq, reps)
                elif k == "amx dQT":
                    amx_loop(kp, KT, Dp, dqT, reps, False)
                elif k == "amx dQT + tile_t":
                    amx_loop(kp, KT, Dp, dqT, reps, True)
                elif k == "tile_t (per key tile)":
                    tile_t_loop(kp, KT, reps * 4)
                    t[k].append((time.perf_counter() - t0) / (reps * 4 * nkb) * 1e6)
                    continue
                else:
                    ds_loop(Pb, dPT, delta, Dp, reps * tiles, ("ds rows (_ds_bf16)", "ds rows+pairs (ds_pairs)").index(k))
                t[k].append((time.perf_counter() - t0) / (reps * tiles) * 1e6)
        print(f"D {D} BQ {BQ} BK {BK} L {L} (AMX dQ bits == MKL's: {same}; dS passes' bits equal: {ds_same}); µs per 256×256 tile, medians of {a.rounds} (min–max):")
        for k, v in t.items():
            print(f"  {k:22s} {np.median(v):7.2f}  ({min(v):.2f}–{max(v):.2f})")


if __name__ == "__main__":
    main()
