"""Where a SmolLM2 prompt pass's time goes: projections, attention, cache writes, element-wise
steps, the rest — and which thread mode each layer ran in.

Runs ``--rounds`` generations of one new token after a ``--length``-token prompt (after one
untimed warm-up), with ``perf_counter`` wrappers around the prompt pass's projections
(``_RowHalves.__call__``), its attention calls (``dotattn.attention`` as the model calls it),
the cache writes (``_Caches.write_prefill``) and the element-wise phases (``_launch.run_chunks``
of the ``_cpu_model_ops`` kernels); "rest" is the time to the first token minus those
(embedding, the last token's output projection, sampling, Python).  Each line also gives the
layers' thread modes (``M`` all cores, ``1`` the calling thread alone, :class:`_StepThreads`)::

    PYTHONPATH=src .venv/bin/python benchmarks/prefill_profile.py --length 512

Run under ``flock /tmp/bench.lock`` on a shared machine and write ``uptime`` beside figures
(the wrappers add ≈ 1 µs a call).  "others'" is the cores other programs kept busy during the
pass (``/proc/stat`` busy time less this process's; 10 ms ticks, so ± 0.02–0.05 at 512 tokens).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections import defaultdict

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)

    import dotattn.models.smollm as sm
    from dotattn.kernels import _cpu_model_ops as ops
    from dotattn.kernels import _launch
    from generate import cpu_seconds  # benchmarks/generate.py (this script's directory)

    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    model = sm.SmolLM()
    ids = np.random.default_rng(0).integers(100, 40000, args.length).tolist()
    model.generate_ids(ids, max_new_tokens=1, stop_at_eos=False)  # warm-up (compiles, thread choices)

    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    modes: list[str] = []
    elementwise = {ops.add_rms_norm: "norm", ops.rope: "rope", ops.swiglu: "swiglu"}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - t0
                counts[name] += 1

        return wrapper

    halves, attention, write = sm._RowHalves.__call__, sm.attention, sm._Caches.write_prefill
    run_chunks, record = _launch.run_chunks, sm._StepThreads.record

    def chunks(fn, a, n):
        name = elementwise.get(fn)
        if name is None:  # the projections' and attention's own chunks: inside their timers
            return run_chunks(fn, a, n)
        return timed(name, run_chunks)(fn, a, n)

    def recorded(self, many, s):
        modes.append("M" if many else "1")
        return record(self, many, s)

    sm._RowHalves.__call__ = timed("projections", halves)
    sm.attention = timed("attention", attention)
    sm._Caches.write_prefill = timed("cache writes", write)
    _launch.run_chunks = chunks
    sm._StepThreads.record = recorded
    try:
        for _ in range(args.rounds):
            seconds.clear()
            counts.clear()
            modes.clear()
            busy0, own0 = cpu_seconds()
            model.generate_ids(ids, max_new_tokens=1, stop_at_eos=False)
            busy1, own1 = cpu_seconds()
            total = model.last_stats.prefill_seconds
            parts = dict(seconds)
            rest = total - sum(parts.values())
            text = ", ".join(f"{k} {v * 1e3:.1f} ({counts[k]})" for k, v in parts.items())
            print(f"{args.length} tokens: {args.length / total:.1f} tok/s = {total * 1e3:.1f} ms: {text}, rest {rest * 1e3:.1f}; "
                  f"layers {''.join(modes)}; CPU: ours {(own1 - own0) / total:.2f}, others' {max(0.0, (busy1 - busy0) - (own1 - own0)) / total:.2f} cores", flush=True)
    finally:
        sm._RowHalves.__call__, sm.attention, sm._Caches.write_prefill = halves, attention, write
        _launch.run_chunks, sm._StepThreads.record = run_chunks, record
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
