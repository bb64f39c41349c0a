"""A/B of the prompt pass's thread policy on one SmolLM2 model: the layers' one-thread chooser
(:class:`dotattn.models.smollm._StepThreads`, what prompt passes of every length had) against
all cores always (what passes of ≥ ``_RowHalves.MIN_ROWS`` tokens have now), alternating.

Each round runs both sides twice: first with a busy loop in another process holding a core
(load arriving), then without it (load gone).  Printed per pass: time to the first token, the
cores other programs kept busy (``/proc/stat`` less this process; the busy loop included),
and for the chooser the layers' modes (``M`` all cores, ``1`` the calling thread alone)::

    PYTHONPATH=src .venv/bin/python benchmarks/prefill_threads_ab.py --length 512 --rounds 6

Run under ``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dotattn.models.smollm as sm
    from generate import cpu_seconds, others, uptime

    class Chooser(sm._StepThreads):
        def record(self, many, seconds):
            modes.append("M" if many else "1")
            return super().record(many, seconds)

    modes: list[str] = []
    model = sm.SmolLM()
    ids = np.random.default_rng(0).integers(100, 40000, args.length).tolist()
    prefill = sm.SmolLM._prefill

    def with_chooser(self, ids_, lengths, caches):
        # the layers get a chooser as before (its state kept across passes)
        chooser = state.setdefault("chooser", Chooser())
        layers = self._layers

        def layers_with(x, positions, attend, ws, threads=None, mm=None):
            return layers(x, positions, attend, ws, chooser, mm)

        self._layers = layers_with
        try:
            return prefill(self, ids_, lengths, caches)
        finally:
            del self._layers

    state: dict = {}
    print("load:", uptime(), flush=True)
    sides = {"chooser": with_chooser, "all cores": prefill}
    times = {(k, c): [] for k in sides for c in ("burn", "quiet")}
    for r in range(-1, args.rounds):  # round -1: warm-up, untimed
        for cond in ("burn", "quiet"):
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "burn" else None
            line = []
            try:
                for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                    sm.SmolLM._prefill = sides[side]
                    modes.clear()
                    try:
                        c0 = cpu_seconds()
                        model.generate_ids(ids, max_new_tokens=1, stop_at_eos=False)
                        c1 = cpu_seconds()
                    finally:
                        sm.SmolLM._prefill = prefill
                    t = model.last_stats.prefill_seconds
                    if r >= 0:
                        times[side, cond].append(t)
                        line.append(f"{side} {t * 1e3:.0f} ms (others {others(c0, c1) / t:.2f}) {''.join(modes)}")
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            if r >= 0:
                print(f"round {r} {cond}: " + " | ".join(line), flush=True)
    for cond in ("burn", "quiet"):
        med = {k: statistics.median(times[k, cond]) for k in sides}
        print(f"{args.length} tokens, {cond}, medians of {args.rounds}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()))
    print("load:", uptime(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
