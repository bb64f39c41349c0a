"""SmolLM2's prompt-pass projections by each BLAS the model can take: MKL's sgemm (torch's
library) and NumPy's OpenBLAS in column halves on two threads, one BLAS thread each (the way
``smollm._RowHalves`` runs them), and torch.mm on torch's two OpenMP threads (transformers' way).

Each round times one pass over the model's own 30 layers' four matrices (qkv, o, gate/up,
down: the weights come from DRAM, as in the model) with random ``--rows`` token rows, the
libraries in turn, 0.3 s apart; printed: ms per layer and GFLOP/s, medians of ``--rounds``::

    PYTHONPATH=src .venv/bin/python benchmarks/prefill_gemm_libraries.py --rows 512 --rounds 6

Run under ``flock /tmp/bench.lock`` on a shared machine and write ``uptime`` beside figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MATRICES = ("qkv", "o", "gate_up", "down")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)

    import torch
    from generate import uptime  # benchmarks/generate.py (this script's directory)

    from dotattn.models import smollm

    print("load:", uptime(), flush=True)
    model = smollm.SmolLM()
    layers = model.w["layers"]
    rng = np.random.default_rng(0)
    xs = {n: rng.standard_normal((args.rows, n), dtype=np.float32) for n in {layers[0][k].shape[1] for k in MATRICES}}
    outs = {k: np.empty((args.rows, layers[0][k].shape[0]), np.float32) for k in MATRICES}
    pool = ThreadPoolExecutor(1)

    def halves(sgemm):
        def one_pass():
            for layer in layers:
                for k in MATRICES:
                    w, out = layer[k], outs[k]
                    x, h = xs[w.shape[1]], w.shape[0] // 2
                    other = pool.submit(sgemm, x, w[h:], out[:, h:])
                    sgemm(x, w[:h], out[:, :h])
                    other.result()
        return one_pass

    xt = {n: torch.from_numpy(x) for n, x in xs.items()}
    ot = {k: torch.from_numpy(o) for k, o in outs.items()}
    wt = [{k: torch.from_numpy(layer[k]) for k in MATRICES} for layer in layers]

    def torch_mm():
        for layer in wt:
            for k in MATRICES:
                torch.mm(xt[layer[k].shape[1]], layer[k].T, out=ot[k])

    sides = {}
    for make in (smollm._mkl_sgemm, smollm._openblas_sgemm):
        sgemm = make()
        if sgemm is not None:
            sides[f"{sgemm.library} column halves"] = halves(sgemm)
    sides[f"torch.mm, {torch.get_num_threads()} threads"] = torch_mm
    flops = 2 * args.rows * sum(layers[0][k].shape[0] * layers[0][k].shape[1] for k in MATRICES)
    times = {name: [] for name in sides}
    for name, run in sides.items():
        run()  # warm-up
    for r in range(args.rounds):
        for name, run in sides.items() if r % 2 == 0 else list(sides.items())[::-1]:
            time.sleep(0.3)  # torch's OpenMP workers spin a while after its products, on our cores
            t = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t) / len(layers))
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{args.rows} rows, {name:>28}: {m * 1e3:7.2f} ms a layer, {flops / m / 1e9:6.1f} GFLOP/s "
              f"(rounds {min(ts) * 1e3:.2f}–{max(ts) * 1e3:.2f} ms)")
    print("load:", uptime(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
