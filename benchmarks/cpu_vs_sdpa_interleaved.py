"""dotattn's cpu backend and torch SDPA called in turn, one process: medians and their ratio.

Background load moves every figure on a shared machine; calls interleaved round by round
(dotattn, SDPA, dotattn, SDPA, …) see the same load, so their ratio survives it better than
two separate loops.  Run it once per code version (``PYTHONPATH=<tree>/src``) and alternate the
versions to compare them.  The bracket adds each peer's CPU time (all its threads): a thread
the OS deschedules stops counting, so on a loaded machine that ratio moves less than the
wall-clock one (spinning idle threads count, though).

    .venv/bin/python benchmarks/cpu_vs_sdpa_interleaved.py [--rounds 5] [--cases dense64,dense128,causal,fwdbwd,fwdbwd128,causal-fwdbwd]
"""

from __future__ import annotations

import argparse
import statistics
import time

CASES = {
    "dense64": dict(H=8, L=4096, D=64, causal=False, backward=False),
    "dense128": dict(H=4, L=4096, D=128, causal=False, backward=False),
    "causal": dict(H=8, L=4096, D=64, causal=True, backward=False),
    "fwdbwd": dict(H=8, L=4096, D=64, causal=False, backward=True),
    "fwdbwd128": dict(H=4, L=4096, D=128, causal=False, backward=True),
    "causal-fwdbwd": dict(H=8, L=4096, D=64, causal=True, backward=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default="dense64,dense128,causal,fwdbwd")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    import dotattn
    import dotattn.torch as dt

    tdtype = getattr(torch, args.dtype)
    for name in args.cases.split(","):
        c = CASES[name]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, c["H"], c["L"], c["D"], generator=g).to(tdtype) for _ in range(3))
        dout = torch.randn(1, c["H"], c["L"], c["D"], generator=g).to(tdtype)

        def ours():
            if not c["backward"]:
                with torch.no_grad():
                    return dt.attention(q, k, v, causal=c["causal"], implementation="cpu")
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            dt.attention(qq, kk, vv, causal=c["causal"], implementation="cpu").backward(dout)

        def sdpa():
            if not c["backward"]:
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=c["causal"])
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=c["causal"]).backward(dout)

        times = {"dotattn": [], "sdpa": []}
        cpu = {"dotattn": [], "sdpa": []}
        for rnd in range(args.rounds + 1):
            for peer, fn in (("dotattn", ours), ("sdpa", sdpa)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if rnd:  # round 0 warms up (loads the kernels)
                    times[peer].append(time.perf_counter() - t0)
                    cpu[peer].append(time.process_time() - c0)
                time.sleep(0.2)  # let the other peer's spinning threads park
        med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        cmed = {p: statistics.median(t) * 1e3 for p, t in cpu.items()}
        print(f"{name:<14} dotattn {med['dotattn']:8.1f} ms  sdpa {med['sdpa']:8.1f} ms  × sdpa {med['sdpa'] / med['dotattn']:.2f}"
              f"   [CPU time, all threads: dotattn {cmed['dotattn']:8.1f} ms  sdpa {cmed['sdpa']:8.1f} ms  "
              f"× sdpa {cmed['sdpa'] / cmed['dotattn']:.2f}]", flush=True)


if __name__ == "__main__":
    main()
