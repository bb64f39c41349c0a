"""Decoding on a CUDA GPU: ``attention_with_kvcache`` on CUDA tensors (the triton split-KV
kernel) against torch SDPA in its fastest decode form, same process, same caches.

    python3 benchmarks/gpu_decode.py                       # the issue's decode shapes
    python3 benchmarks/gpu_decode.py --batches 8 --contexts 32768 --dtypes bfloat16 --profile

The shapes are ``dotattn bench --shapes decode``'s: one query token per sequence, Hq 32 query
heads over Hkv 8 K/V heads, D 128, batch 1 and 8, contexts 4k and 32k; the cache contiguous
and paged (pages of 256 tokens in a shuffled order).  SDPA gets the query-head group folded
into query rows (``q.view(B, Hkv, Hq // Hkv, D)``, same dtype).  Times are
``triton.testing.do_bench`` medians (CUDA events around many calls, so the host's launch
work counts where it is longer than the GPU's).  GB/s = K/V bytes a call must read
(``2·B·Hkv·context·D·itemsize``) over its time; the yardstick is a device read measured in
the same run (a float32 sum over a buffer far larger than the L2).

"+append ms" times the call of a decode step: one new token's key and value appended (at
position L − 1, the same slot every call) and then attended.  ``--profile`` adds, per case, the GPU time of each kernel a call launches (torch.profiler),
so the split-KV kernel's time can be told from the merge's and the call's other work.
``--slow-launch`` launches every kernel through Triton's own per-call path (no kept compiled
kernel: ``triton_decode.FAST_LAUNCH = False``), for the host time before/after.
``--host-profile`` runs cProfile over 300 calls of each case given (no timing, no SDPA) and
prints the functions taking the most host time per call, to split the host floor of a call.
``--sweep`` times the kernel's tile choices instead (``triton_decode.GPU_TILES``: keys a
tile, warps, pipeline stages) on the cases given, each against the current choice.
"host µs" is the median time the host spends issuing one call with no synchronization between
calls: where it is near the call's time, the call is bound by its host work (or waits for the
GPU inside the call).  Without a CUDA device the script says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import sys


def device_read_gbs() -> float:
    """GB/s of a float32 sum over 4 GiB (the H200's L2 is 60 MB)."""
    import torch
    from triton.testing import do_bench

    x = torch.ones(1 << 30, dtype=torch.float32, device="cuda")
    ms = do_bench(lambda: x.sum())
    del x
    return 4 * (1 << 30) / (ms * 1e-3) / 1e9


def make_case(B, L, dtype_name, paged, Hq=32, Hkv=8, D=128, page=256, seed=0):
    import numpy as np
    import torch

    dt = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, device="cuda", generator=gen).to(dt)
    lens = np.full(B, L, dtype=np.int64)
    if paged:
        n_pages = B * L // page
        k = torch.randn(n_pages, Hkv, page, D, device="cuda", generator=gen).to(dt)
        v = torch.randn(n_pages, Hkv, page, D, device="cuda", generator=gen).to(dt)
        table = np.random.default_rng(seed).permutation(n_pages).reshape(B, L // page).astype(np.int32)
        # SDPA reads the same values, gathered into a contiguous cache
        idx = torch.as_tensor(table, device="cuda").long()
        kc = k[idx].permute(0, 2, 1, 3, 4).reshape(B, Hkv, L, D)
        vc = v[idx].permute(0, 2, 1, 3, 4).reshape(B, Hkv, L, D)
    else:
        k = torch.randn(B, Hkv, L, D, device="cuda", generator=gen).to(dt)
        v = torch.randn(B, Hkv, L, D, device="cuda", generator=gen).to(dt)
        table, kc, vc = None, k, v
    return q, k, v, lens, table, kc, vc


def host_us(fn, calls: int = 50) -> float:
    """Median µs the host spends issuing one call (no synchronization between calls, so a call
    that waits for the GPU — a copy from pageable memory, a ``.item()`` — shows its wait)."""
    import time

    import torch

    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2] * 1e6


def run_case(B, L, dtype_name, paged, profile=False):
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    import dotattn

    Hq, Hkv, D = 32, 8, 128
    q, k, v, lens, table, kc, vc = make_case(B, L, dtype_name, paged, Hq, Hkv, D)

    def ours():
        return dotattn.attention_with_kvcache(q, k, v, cache_lengths=lens, block_table=table)

    # a decode step's call: the new token's key and value appended at position L − 1, then read
    # (the same slot every call: the cache keeps its size)
    kn = torch.randn(B, Hkv, 1, D, device="cuda").to(q.dtype)
    vn = torch.randn(B, Hkv, 1, D, device="cuda").to(q.dtype)

    def ours_append():
        return dotattn.attention_with_kvcache(q, k, v, kn, vn, cache_lengths=lens - 1, block_table=table)

    qf = q.view(B, Hkv, Hq // Hkv, D)

    def sdpa():
        return F.scaled_dot_product_attention(qf, kc, vc)

    with torch.no_grad():
        out = ours().float()
        ref = sdpa().float().reshape(B, Hq, 1, D)
        err = float((out - ref).abs().max())
        t_ours = do_bench(ours)
        t_sdpa = do_bench(sdpa)
        t_append = do_bench(ours_append)
        host_ours, host_sdpa, host_append = host_us(ours), host_us(sdpa), host_us(ours_append)
        kernels = None
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            for _ in range(3):
                ours()
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(10):
                    ours()
                torch.cuda.synchronize()
            rows = []
            for e in p.key_averages():
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                if t > 0:
                    rows.append((e.key[:60], e.count // 10, t / 10 / 1000))
            kernels = sorted(rows, key=lambda r: -r[2])[:8]
    nbytes = 2 * B * Hkv * L * D * q.element_size()
    return dict(B=B, L=L, dtype=dtype_name, paged=paged, ours_ms=t_ours, sdpa_ms=t_sdpa,
                ours_gbs=nbytes / (t_ours * 1e-3) / 1e9, sdpa_gbs=nbytes / (t_sdpa * 1e-3) / 1e9,
                max_abs_diff=err, kernels=kernels, host_us=host_ours, sdpa_host_us=host_sdpa,
                append_ms=t_append, append_host_us=host_append)


SWEEP = {
    2: [(64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 4), (32, 4, 4), (128, 8, 4)],
    3: [(64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 4), (32, 4, 4), (128, 8, 4)],
    0: [(32, 4, 3), (32, 8, 3), (64, 8, 3), (16, 4, 4), (32, 4, 4), (64, 8, 4)],
}


def sweep(args, read) -> None:
    import torch
    from triton.testing import do_bench

    import dotattn
    from dotattn.kernels import triton_decode

    default = dict(triton_decode.GPU_TILES)
    for dt in args.dtypes:
        terms = {"float16": 2, "bfloat16": 3}.get(dt, 0)
        for B in args.batches:
            for L in args.contexts:
                q, k, v, lens, table, _, _ = make_case(B, L, dt, False)
                nbytes = 2 * B * 8 * L * 128 * q.element_size()
                row = []
                for tiles in SWEEP[terms]:
                    triton_decode.GPU_TILES[terms] = tiles
                    with torch.no_grad():
                        ms = do_bench(lambda: dotattn.attention_with_kvcache(q, k, v, cache_lengths=lens))
                    row.append(f"{tiles}: {ms:.4f} ms {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s")
                triton_decode.GPU_TILES.update(default)
                print(f"sweep B{B} {L // 1024}k {dt} (default {default[terms]}, device read {read:.0f} GB/s)")
                for line in row:
                    print("   ", line, flush=True)


def host_profile(args) -> None:
    """Where a call's host time goes: cProfile over 300 calls, µs per call by function."""
    import cProfile
    import pstats

    import torch

    import dotattn

    for dt in args.dtypes:
        for B in args.batches:
            for L in args.contexts:
                for layout in args.layouts:
                    q, k, v, lens, table, _, _ = make_case(B, L, dt, layout == "paged")
                    with torch.no_grad():
                        for _ in range(20):
                            dotattn.attention_with_kvcache(q, k, v, cache_lengths=lens, block_table=table)
                        torch.cuda.synchronize()
                        pr = cProfile.Profile()
                        pr.enable()
                        for _ in range(300):
                            dotattn.attention_with_kvcache(q, k, v, cache_lengths=lens, block_table=table)
                        pr.disable()
                        torch.cuda.synchronize()
                    st = pstats.Stats(pr)
                    rows = sorted(((tt / 300 * 1e6, ct / 300 * 1e6, nc // 300, f"{fn[0].split('/')[-1]}:{fn[1]} {fn[2]}")
                                   for fn, (cc, nc, tt, ct, _) in st.stats.items()), reverse=True)
                    total = sum(r[0] for r in rows)
                    print(f"host profile B{B} {L // 1024}k {dt} {layout}: {total:.0f} µs a call under cProfile;"
                          " own µs, cumulative µs, calls a call, function")
                    for own, cum, n, name in rows[:25]:
                        print(f"    {own:7.1f} {cum:8.1f} {n:4d}  {name[:100]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    ap.add_argument("--layouts", nargs="+", default=["contiguous", "paged"], choices=["contiguous", "paged"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--host-profile", action="store_true")
    ap.add_argument("--slow-launch", action="store_true", help="launch through Triton on every call "
                    "(triton_decode.FAST_LAUNCH = False), to compare the host's time")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    if args.slow_launch:
        from dotattn.kernels import triton_decode

        triton_decode.FAST_LAUNCH = False
    if args.host_profile:
        host_profile(args)
        return 0
    read = device_read_gbs()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  device read {read:.0f} GB/s")
    if args.sweep:
        sweep(args, read)
        return 0
    print(f"{'case':<28} {'dotattn ms':>10} {'SDPA ms':>9} {'× SDPA':>7} {'GB/s':>7} {'share':>6} {'SDPA GB/s':>9} {'|diff|':>8}"
          f" {'host µs':>8} {'SDPA host':>9} {'+append ms':>10} {'its host':>8}")
    results = []
    for dt in args.dtypes:
        for B in args.batches:
            for L in args.contexts:
                for layout in args.layouts:
                    r = run_case(B, L, dt, layout == "paged", args.profile)
                    results.append(r)
                    name = f"B{B} {L // 1024}k {dt} {layout}"
                    print(f"{name:<28} {r['ours_ms']:>10.4f} {r['sdpa_ms']:>9.4f} {r['sdpa_ms'] / r['ours_ms']:>7.2f}"
                          f" {r['ours_gbs']:>7.0f} {r['ours_gbs'] / read:>6.0%} {r['sdpa_gbs']:>9.0f} {r['max_abs_diff']:>8.1e}"
                          f" {r['host_us']:>8.0f} {r['sdpa_host_us']:>9.0f} {r['append_ms']:>10.4f}"
                          f" {r['append_host_us']:>8.0f}",
                          flush=True)
                    for kname, count, ms in r["kernels"] or ():
                        print(f"      {ms * 1e3:9.1f} µs  ×{count:<4} {kname}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device_read_gbs=read, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
