"""Forward and backward TFLOP/s on a CUDA GPU: dotattn's triton backend vs torch SDPA (flash)
and, where installed, flash-attn — same process, same tensors.

    .venv/bin/python benchmarks/gpu.py                      # d64/d128, bf16, L = 1k…16k, causal and not
    .venv/bin/python benchmarks/gpu.py --lengths 8192 --dims 128 --json

Shapes follow the FlashAttention papers' convention: ``B·L = 16k`` tokens, ``H = 2048 / D``
heads (hidden size 2048), layout ``(B, H, L, D)`` (``(B, L, H, D)`` for flash-attn).  Times are
``triton.testing.do_bench`` medians (CUDA events; warm-up and L2 flush included).  FLOPs:
forward ``4·B·H·L²·D`` (halved for causal), backward ``2.5×`` the forward (5 GEMMs of 2).

Rows: ``dotattn`` (``dotattn.torch.attention``: the custom op and the triton kernels),
``sdpa-flash`` (``torch.nn.functional.scaled_dot_product_attention`` forced to its flash
backend) and ``flash-attn`` (``flash_attn_func``).  A peer that cannot run prints ``n/a`` with
the reason.  Without a CUDA device the script says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import sys


def flops(B, H, L, D, causal, mode) -> float:
    f = 4.0 * B * H * L * L * D / (2 if causal else 1)
    return f * (2.5 if mode == "bwd" else 1.0)


def _peers():
    import torch

    import dotattn.torch as dtorch

    def dotattn_fn(q, k, v, causal):
        return dtorch.attention(q, k, v, causal=causal)

    def sdpa_flash(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    peers = {"dotattn": dotattn_fn, "sdpa-flash": sdpa_flash}
    try:
        from flash_attn import flash_attn_func

        def flash(q, k, v, causal):
            # flash-attn takes (B, L, H, D): the transposes are views, its kernel reads strides
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return out.transpose(1, 2)

        peers["flash-attn"] = flash
    except ImportError as exc:
        peers["flash-attn"] = f"not installed ({exc.name})"
    return peers


def bench_one(fn, B, H, L, D, causal, mode):
    import torch
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen,
                           requires_grad=mode == "bwd") for _ in range(3))
    if mode == "fwd":
        with torch.no_grad():
            ms = do_bench(lambda: fn(q, k, v, causal))
    else:
        out = fn(q, k, v, causal)
        dout = torch.randn_like(out)
        ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    return ms, flops(B, H, L, D, causal, mode) / (ms * 1e-3) / 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    ap.add_argument("--causal", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: benchmarks/gpu.py measures nothing on this machine", file=sys.stderr)
        return 0
    peers = _peers()
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'mode':<4} {'causal':<6} {'D':>4} {'L':>6} " + " ".join(f"{n:>14}" for n in peers) + "   dotattn/sdpa")
    for mode in args.modes:
        for causal in (c == "yes" for c in args.causal):
            for D in args.dims:
                for L in args.lengths:
                    B, H = max(1, 16384 // L), 2048 // D
                    cells, row = [], dict(mode=mode, causal=causal, D=D, L=L, B=B, H=H)
                    for name, fn in peers.items():
                        if isinstance(fn, str):
                            cells.append(f"{'n/a':>14}")
                            row[name] = fn
                            continue
                        try:
                            ms, tf = bench_one(fn, B, H, L, D, causal, mode)
                            cells.append(f"{tf:>9.1f} TF/s")
                            row[name] = {"ms": ms, "tflops": tf}
                        except Exception as exc:  # a peer's own limit (e.g. no flash kernel for this GPU)
                            cells.append(f"{'n/a':>14}")
                            row[name] = f"{type(exc).__name__}: {exc}"[:200]
                    ours, sdpa = row.get("dotattn"), row.get("sdpa-flash")
                    ratio = ours["tflops"] / sdpa["tflops"] if isinstance(ours, dict) and isinstance(sdpa, dict) else None
                    row["ratio_vs_sdpa"] = ratio
                    rows.append(row)
                    print(f"{mode:<4} {str(causal):<6} {D:>4} {L:>6} " + " ".join(cells)
                          + (f"   {ratio:.2f}×" if ratio else ""))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
