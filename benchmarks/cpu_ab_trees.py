"""Two source trees of dotattn (old, new) timed in turn: call by call, round by round.

A change to the compiled kernels cannot be A/B-timed inside one process (one package, one
set of kernels), and two separate runs on a shared machine see different loads.  This starts
one worker process per tree (``PYTHONPATH=<tree>``, warmed up: compiles and caches done),
then asks them in turn — old, new, old, new, … — for one call each, so both see the same
load; it prints each tree's median and the new/old time ratio per case.  Optionally torch
SDPA in a third worker (``--sdpa``) for the × SDPA ratio.

Each tree's worker reports its warm-up time (tens of seconds: its kernels were compiled by
these first calls, not loaded), how its float32 products run, and a hash of each case's
result; the driver prints whether old and new gave the same bits per case.  With
``--dtype float32`` it warns when the two trees run different float32 product routes: the
route is stored per machine in ``kernels/_precompiled/f32_route.json``, which a ``git
archive`` copy or a fresh worktree lacks (its calls then take the split-AMX route, where
this host's stored choice is MKL's tiles), so the A/B would time the route, not the trees —
the "kernels compiled on first calls run slower" of 1 Dec was exactly that
(docs/performance-log.md, "Kernels compiled on a first call …").  Pin one route for both with
``DOTATTN_F32_PRODUCTS=mkl`` (or ``amx5``), or ``DOTATTN_F32_ROUTE_FILE=none``.

    .venv/bin/python benchmarks/cpu_ab_trees.py --old /tmp/old/src --new src \\
        --cases dense64,dense128,causal --dtype bfloat16 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "dense64": dict(H=8, L=4096, D=64, causal=False),
    "dense128": dict(H=4, L=4096, D=128, causal=False),
    "causal": dict(H=8, L=4096, D=64, causal=True),
    "fwdbwd": dict(H=8, L=4096, D=64, causal=False, backward=True),  # forward + backward (torch tensors)
    "fwdbwd128": dict(H=4, L=4096, D=128, causal=False, backward=True),  # issue 13's other two
    "fwdbwd-causal": dict(H=8, L=4096, D=64, causal=True, backward=True),  # fwd+bwd shapes
    # the backward alone (NumPy API, in --dtype; the forward's out and LSE computed once; no --sdpa peer)
    "bwd64": dict(H=8, L=4096, D=64, causal=False, backward_only=True),
    "bwd128": dict(H=4, L=4096, D=128, causal=False, backward_only=True),
    "bwd-causal": dict(H=8, L=4096, D=64, causal=True, backward_only=True),
    # SmolLM2-135M's prompt pass: 9 query heads on 3 K/V heads, causal (the grouped forward)
    "gqa-causal": dict(H=9, Hkv=3, L=4096, D=64, causal=True),
    "gqa-causal-512": dict(H=9, Hkv=3, L=512, D=64, causal=True),  # ... at its 512-token prompt
    # causal with 128 keys more than queries (bottom-right: a 128-key prefix), so the diagonal
    # falls inside the tiles: PARTIAL tiles whose rows see part of their keys (NumPy API; no
    # --sdpa peer: SDPA's is_causal aligns Lq ≠ Lk top-left, and its worker times L × L)
    "causal-prefix": dict(H=8, L=3968, Lk=4096, D=64, causal=True),
    "bwd-causal-prefix": dict(H=8, L=3968, Lk=4096, D=64, causal=True, backward_only=True),
}

WORKER = r"""
import hashlib, json, sys, time
import numpy as np
started = time.perf_counter()
kind, dtype = sys.argv[1], sys.argv[2]
cases = json.loads(sys.argv[3])
rng = np.random.default_rng(0)
calls = {}
info = {}
if kind == "sdpa":
    import torch, torch.nn.functional as F
    torch.set_num_threads(2)
    for name, c in cases.items():
        q, k, v, do = (torch.randn(1, h, c["L"], c["D"]).to(getattr(torch, dtype))
                       for h in (c["H"], c.get("Hkv", c["H"]), c.get("Hkv", c["H"]), c["H"]))
        def run(q=q, k=k, v=v, do=do, c=c):
            if c.get("backward"):
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                F.scaled_dot_product_attention(qq, kk, vv, is_causal=c["causal"]).backward(do)
                return
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=c["causal"], enable_gqa="Hkv" in c)
        calls[name] = run
else:
    import dotattn
    from dotattn.semantics import BFLOAT16
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    for name, c in cases.items():
        q, k, v, do = (rng.standard_normal((1, h, n, c["D"]), dtype=np.float32).astype(dt)
                       for h, n in ((c["H"], c["L"]), (c.get("Hkv", c["H"]), c.get("Lk", c["L"])),
                                    (c.get("Hkv", c["H"]), c.get("Lk", c["L"])), (c["H"], c["L"])))
        if c.get("backward_only"):
            o, lse = dotattn.attention(q, k, v, causal=c["causal"], return_lse=True, implementation="cpu")
            def run(q=q, k=k, v=v, do=do, c=c, o=o, lse=lse):
                return dotattn.attention_backward(q, k, v, o, lse, do, causal=c["causal"], implementation="cpu")
            calls[name] = run
            continue
        if c.get("backward"):  # through the torch front end, as the SDPA peer
            import torch, dotattn.torch as dtorch
            # the tensors in --dtype made once, outside the timed call, as the SDPA worker's (until
            # 2 Dec 13:45 each call converted q, K, V and dO from bfloat16 NumPy arrays through
            # float32 — ≈ 20 ms of a ≈ 100 ms H4 L4096 D128 fwd+bwd timed as ours)
            tt = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32)).to(getattr(torch, dtype))
            tensors = tuple(tt(x) for x in (q, k, v, do))
            def run(t=tensors, c=c):
                qq, kk, vv = (x.detach().requires_grad_() for x in t[:3])
                dtorch.attention(qq, kk, vv, causal=c["causal"], implementation="cpu").backward(t[3])
            calls[name] = run
            continue
        def run(q=q, k=k, v=v, c=c):
            return dotattn.attention(q, k, v, causal=c["causal"], implementation="cpu")
        calls[name] = run
def digest(result):
    arrays = [np.asarray(x) for x in (result if isinstance(result, tuple) else (result,)) if x is not None]
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()[:16] if arrays else None
info["bits"] = {name: digest(run()) for name, run in calls.items()}
for run in calls.values():
    run()
info["warm_up_s"] = round(time.perf_counter() - started, 1)
if kind != "sdpa" and dtype == "float32":
    from dotattn.kernels import cpu
    on, why = cpu.f32_products_path()
    info["f32_products"] = ["split-AMX" if on else "sgemm", why]
print("ready " + json.dumps(info), flush=True)
for line in sys.stdin:
    name = line.strip()
    t0, c0 = time.perf_counter(), time.process_time()
    calls[name]()
    print(json.dumps([time.perf_counter() - t0, time.process_time() - c0]), flush=True)
"""


def _worker(kind: str, tree: str | None, dtype: str, cases: dict) -> tuple[subprocess.Popen, dict]:
    """A warmed-up worker and what it reports: warm-up seconds, float32 products, result hashes."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.path.abspath(tree)
    p = subprocess.Popen(
        [sys.executable, "-c", WORKER, kind, dtype, json.dumps(cases)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    line = p.stdout.readline().strip()
    assert line.startswith("ready"), f"worker {kind} {tree} failed"
    return p, json.loads(line[len("ready"):])


def route_warning(infos: dict[str, dict], dtype: str) -> str | None:
    """A warning when the trees' float32 calls take different product routes (the A/B would
    time the route, not the trees), else None."""
    routes = {w: i["f32_products"][0] for w, i in infos.items() if "f32_products" in i}
    if dtype != "float32" or len(set(routes.values())) < 2:
        return None
    said = "; ".join(f"{w}: {routes[w]} ({infos[w]['f32_products'][1]})" for w in routes)
    return (f"WARNING: the trees' float32 products take different routes — {said}. "
            "This A/B times the route, not the trees; pin one: DOTATTN_F32_PRODUCTS=mkl (or amx5), "
            "or DOTATTN_F32_ROUTE_FILE=none.")


def bits_note(infos: dict[str, dict], name: str) -> str:
    """``same bits`` / ``bits differ`` between old and new for case ``name`` ("" when unknown)."""
    old, new = (infos[w].get("bits", {}).get(name) for w in ("old", "new"))
    if old is None or new is None:
        return ""
    return "; same bits" if old == new else "; bits differ"


def _ask(p: subprocess.Popen, name: str) -> tuple[float, float]:
    p.stdin.write(name + "\n")
    p.stdin.flush()
    return tuple(json.loads(p.stdout.readline()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", required=True)
    parser.add_argument("--new", required=True)
    parser.add_argument("--cases", default="dense64,dense128,causal")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sdpa", action="store_true")
    args = parser.parse_args()
    cases = {n: CASES[n] for n in args.cases.split(",")}
    started = {"old": _worker("dotattn", args.old, args.dtype, cases), "new": _worker("dotattn", args.new, args.dtype, cases)}
    if args.sdpa:
        started["sdpa"] = _worker("sdpa", None, args.dtype, cases)
    workers = {w: p for w, (p, _) in started.items()}
    infos = {w: i for w, (_, i) in started.items()}
    for w, i in infos.items():
        route = f"; float32 products: {i['f32_products'][0]}" if "f32_products" in i else ""
        print(f"{w}: warm-up {i['warm_up_s']:.1f} s{route}")
    warning = route_warning(infos, args.dtype)
    if warning:
        print(warning, flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")
    for name in cases:
        times = {w: [] for w in workers}
        cpu = {w: [] for w in workers}
        for r in range(args.rounds):
            order = list(workers) if r % 2 == 0 else list(reversed(list(workers)))
            for w in order:
                wall, ct = _ask(workers[w], name)
                times[w].append(wall)
                cpu[w].append(ct)
                time.sleep(0.05)
        med = {w: statistics.median(t) * 1e3 for w, t in times.items()}
        mcpu = {w: statistics.median(t) * 1e3 for w, t in cpu.items()}
        line = f"{name}: " + ", ".join(f"{w} {med[w]:.1f} ms (cpu {mcpu[w]:.0f})" for w in workers)
        line += f"; new/old {med['new'] / med['old']:.3f}" + bits_note(infos, name)
        if "sdpa" in workers:
            line += f"; × sdpa old {med['sdpa'] / med['old']:.2f}, new {med['sdpa'] / med['new']:.2f}"
        print(line, flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")
    for p in workers.values():
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()
