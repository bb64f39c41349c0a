"""A/B of SmolLM2's prompt pass: the working tree's code against a git revision's, alternating
in one process (a shared machine's load then weighs on both alike).

The old side is ``src/dotattn/models/smollm.py`` and ``kernels/_launch.py``'s ``run_chunks``
as they are at ``--old`` (loaded from git under other module names; the rest of dotattn is the
working tree's), the new side the working tree's.  Each round runs one prompt pass (a
generation of one token after a ``--length``-token prompt) per side, in alternating order;
printed: time to the first token per pass, the medians, their ratio, and the cores other
programs kept busy during each pass (``/proc/stat`` less this process)::

    PYTHONPATH=src .venv/bin/python benchmarks/prefill_ab.py --old main --length 512 --rounds 10 [--burn]

``--burn`` runs each round twice, first with a busy loop in another process (load arriving),
then without (load gone), and reports the two conditions apart.

``--old-set MODULE.NAME=VALUE`` (repeatable) sets a module attribute while the old side runs
(restored after each of its passes): an A/B of a constant outside the two files above, e.g.
``--old HEAD --old-set dotattn.kernels.cpu.GROUPED_CAUSAL_F32_SMALL_MAX_KEYS=0``.

Run under ``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_old(rev: str, path: str, name: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    package = name.rpartition(".")[0]
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git revision of the old side")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--burn", action="store_true",
                        help="each round twice: first with a busy loop (another process) on a core, then without")
    parser.add_argument("--old-set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="a module attribute the old side runs with (a Python literal)")
    args = parser.parse_args(argv)
    overrides = []
    for item in args.old_set:
        target, _, value = item.partition("=")
        module_name, _, attr = target.rpartition(".")
        overrides.append((importlib.import_module(module_name), attr, ast.literal_eval(value)))

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generate import cpu_seconds

    import dotattn.models.smollm as new_sm
    from dotattn.kernels import _launch

    old_sm = load_old(args.old, "src/dotattn/models/smollm.py", "dotattn.models._ab_old_smollm")
    old_launch = load_old(args.old, "src/dotattn/kernels/_launch.py", "dotattn.kernels._ab_old_launch")
    new_run_chunks = _launch.run_chunks
    old_run_chunks = old_launch.run_chunks
    old_launch._executor = _launch._executor  # one pool for both sides

    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    sides = {"old": (old_sm.SmolLM(), old_run_chunks), "new": (new_sm.SmolLM(), new_run_chunks)}
    ids = np.random.default_rng(0).integers(100, 40000, args.length).tolist()
    conditions = ("burn", "quiet") if args.burn else ("",)
    times = {(k, c): [] for k in sides for c in conditions}
    others = {(k, c): [] for k in sides for c in conditions}
    for r in range(-1, args.rounds):  # round -1: warm-up, untimed
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for cond in conditions:
            # the busy loop: another program holding a core while both sides run, then gone
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "burn" else None
            try:
                for side in order:
                    model, run_chunks = sides[side]
                    _launch.run_chunks = run_chunks
                    kept = [(m, a, getattr(m, a)) for m, a, _ in overrides] if side == "old" else []
                    for m, a, value in overrides if side == "old" else ():
                        setattr(m, a, value)
                    try:
                        busy0, own0 = cpu_seconds()
                        model.generate_ids(ids, max_new_tokens=1, stop_at_eos=False)
                        busy1, own1 = cpu_seconds()
                    finally:
                        _launch.run_chunks = new_run_chunks
                        for m, a, value in kept:
                            setattr(m, a, value)
                    if r >= 0:
                        t = model.last_stats.prefill_seconds
                        times[side, cond].append(t)
                        others[side, cond].append(max(0.0, (busy1 - busy0) - (own1 - own0)) / t)
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            if r >= 0:
                print(f"round {r} {cond}: old {times['old', cond][-1] * 1e3:.1f} ms (others {others['old', cond][-1]:.2f}), "
                      f"new {times['new', cond][-1] * 1e3:.1f} ms (others {others['new', cond][-1]:.2f})", flush=True)
    for cond in conditions:
        med = {k: statistics.median(times[k, cond]) for k in sides}
        print(f"{args.length} tokens{' ' + cond if cond else ''}, medians of {args.rounds}: old {med['old'] * 1e3:.1f} ms "
              f"({args.length / med['old']:.1f} tok/s), new {med['new'] * 1e3:.1f} ms ({args.length / med['new']:.1f} tok/s): "
              f"new/old speed {med['old'] / med['new']:.3f}x; others' cores (median) old "
              f"{statistics.median(others['old', cond]):.2f}, new {statistics.median(others['new', cond]):.2f}")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
