"""Generation speed: SmolLM2-135M-Instruct on dotattn vs transformers on the same GGUF weights.

For a 512-token and a 4,096-token prompt, then 128 new tokens (greedy, end-of-turn ignored so
that every run makes exactly 128), it reports prefill tokens/s (prompt tokens / time to the
first new token) and decode tokens/s (127 / time from the first to the last new token), the
median of ``--repeats`` runs, for dotattn (:class:`dotattn.models.SmolLM`) and, where
installed, transformers' ``generate`` on the same GGUF file dequantized to float32 (attention
by torch SDPA, ``attn_implementation="sdpa"``, its KV cache on), in the same process (``n/a``
otherwise), one run of each in turns.  dotattn's decode steps read the weights' block codes
by default (``--decode-weights float32`` reads the float32 matrices, as transformers does).
Each side's prefill time runs from its generation call, so transformers' includes
``generate``'s own setup (≈ 13 ms on the Zen 3, 6 Dec 2026: ≈ 9 % of a 32-token prompt pass,
under 2 % at 512).  The machine's load (``uptime``) is printed before and after, and with each
run the cores other programs kept busy during its prompt pass (``/proc/stat`` less this
process's CPU time: on a shared machine a pass's speed follows it)::

    PYTHONPATH=src .venv/bin/python benchmarks/generate.py [--lengths 512 4096] [--repeats 3]

``--new 1`` times the prompt pass alone (no decode figures); with many ``--repeats`` it prints
the prefill ratio round by round (:func:`prefill_pairs`): ``--lengths 512 --new 1 --repeats
21`` takes ≈ 90 s.

transformers and accelerate are peers for this script only: dotattn never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


TEXT = (
    "Attention lets every token of a sequence look at every other token. A decoder generates one "
    "token at a time: it keeps the keys and values of the tokens it has seen in a cache, so that each "
    "new token costs one pass over the weights and one read of the cache. "
)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime: n/a"


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process) so far: over an interval, the
    first's increase less the second's is what other programs took from the cores meanwhile
    (``/proc/stat``; NaN where it cannot be read)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan"), own.ru_utime + own.ru_stime
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def others(start: tuple[float, float], end: tuple[float, float]) -> float:
    """Cores other programs kept busy, on average, between two :func:`cpu_seconds` readings."""
    seconds = end[1] - start[1]
    return max(0.0, (end[0] - start[0]) - seconds)


def prompt_ids(model, n: int) -> list[int]:
    """Exactly ``n`` token ids of English text (the paragraph repeated)."""
    ids = model.encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def bench_dotattn(model, ids: list[int], new: int, repeats: int) -> dict:
    prefill, decode, busy = [], [], []
    for _ in range(repeats):
        # generate_ids' own step iterator: the first step comes right after the prompt pass,
        # which is where the other programs' share of the cores is read
        start = cpu_seconds()
        t0 = time.perf_counter()
        steps = model._generate_steps([ids], new, 0.0, 1.0, None, False)
        out = []
        for step in steps:
            if not out:
                first = cpu_seconds()
                busy.append(others(start, first) / (time.perf_counter() - t0))
            out.append(step[0][1])
        assert len(out) == new
        prefill.append(model.last_stats.prefill_tokens_per_s)
        decode.append(model.last_stats.decode_tokens_per_s)
        print(f"  dotattn {len(ids)}: prefill {prefill[-1]:.1f} tok/s (others' cores {busy[-1]:.2f}), decode {decode[-1]:.2f} tok/s", flush=True)
    return {"prefill": prefill, "decode": decode, "others_prefill": busy}


PEER_ATTENTION = "sdpa"  # transformers' attn_implementation for the peer


def load_transformers(path):
    try:
        import torch
        import transformers
    except ImportError as exc:
        return None, f"n/a ({exc.name} not installed)"
    try:
        # attention by torch SDPA, named rather than left to transformers' default (it is SDPA
        # in transformers 5, and the fastest of its CPU choices; "eager" materializes the scores)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation=PEER_ATTENTION
        )
    except Exception as exc:  # e.g. accelerate missing, an old transformers without GGUF support
        return None, f"n/a ({type(exc).__name__}: {str(exc)[:120]})"
    model.eval()
    attention = getattr(model.config, "_attn_implementation", None) or "?"
    return model, (f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                   f"attention {attention}, {next(model.parameters()).dtype}")


def bench_transformers(model, ids: list[int], new: int, repeats: int, quiet: bool = False) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Timestamps each put(): the prompt first, then every new token (and the CPU
        readings at the first new token)."""

        def __init__(self):
            self.times = []
            self.cpu = None

        def put(self, value):
            self.times.append(time.perf_counter())
            if len(self.times) == 2:
                self.cpu = cpu_seconds()

        def end(self):
            pass

    prefill, decode, busy = [], [], []
    input_ids = torch.tensor([ids])
    for _ in range(repeats):
        clock = Clock()
        with torch.no_grad():
            cpu = cpu_seconds()
            start = time.perf_counter()
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        assert out.shape[1] == len(ids) + new
        first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt is put before any work
        prefill.append(len(ids) / (first - start))
        decode.append((new - 1) / (last - first) if new > 1 else float("nan"))
        busy.append(others(cpu, clock.cpu) / (first - start))
        if not quiet:
            print(f"  transformers {len(ids)}: prefill {prefill[-1]:.1f} tok/s (others' cores {busy[-1]:.2f}), decode {decode[-1]:.2f} tok/s", flush=True)
    return {"prefill": prefill, "decode": decode, "others_prefill": busy}


def prefill_pairs(ours: list[float], peer: list[float]) -> tuple[list[float], str]:
    """Round by round, our prefill tok/s over the peer's, and a line saying their median, range
    and how many rounds ours was ahead.  A round's two runs saw the same stretch of load, so
    these ratios answer "ahead in every run?", which the ratio of two medians cannot when the
    peer's own speed spreads by 1.5× within minutes."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"prefill_pairs: need one peer run per run of ours, got {len(ours)} and {len(peer)}")
    pairs = [a / b for a, b in zip(ours, peer)]
    ahead = sum(x >= 1.0 for x in pairs)
    return pairs, (f"prefill ratio by round: median {statistics.median(pairs):.3f}, "
                   f"{min(pairs):.3f}–{max(pairs):.3f}, ours ahead in {ahead} of {len(pairs)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--new", type=int, default=128,
                        help="new tokens a run (1: the prompt pass only, no decode figures; with many "
                             "--repeats, the pairs' prefill ratios say how often ours was ahead)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--decode-weights", choices=["blocks", "float32"], default="blocks",
                        help="what dotattn's decode steps read (SmolLM(decode_weights=...)): the weights' exact "
                             "block codes (default) or the float32 matrices")
    args = parser.parse_args(argv)

    from dotattn.models import SmolLM, smollm

    print("load before:", uptime(), flush=True)
    model = SmolLM(decode_weights=args.decode_weights)
    peer, peer_info = (None, "n/a (--no-peer)") if args.no_peer else load_transformers(model.path)
    amx = "on AMX from the weights' exact block codes where ≥ 128 rows, else " if model._mm._pairs else ""
    sgemm = smollm._column_sgemm()
    library = "oneDNN" if smollm._onednn_linear() is not None else (sgemm.library + " sgemm" if sgemm else "torch.mm")
    print(f"dotattn SmolLM: prompt-pass projections {amx}float32 on {model.compute} (compute=; {library} in column "
          f"halves where ≥ 128 rows), decode steps on "
          f"{'exact block codes of the weights' if model.decode_weights == 'blocks' else 'float32 weights'} "
          f"(decode_weights={model.decode_weights!r}); peer: {peer_info}", flush=True)
    results = {"load_before": uptime(), "peer": peer_info, "rows": []}
    header = f"{'prompt':>7} {'new':>4} | {'dotattn prefill':>16} {'peer prefill':>13} {'ratio':>6} | {'dotattn decode':>15} {'peer decode':>12} {'ratio':>6}"
    print(header)
    for n in args.lengths:
        ids = prompt_ids(model, n)
        # One warm-up each at the full prompt length (first calls compile / load the kernels
        # that length needs — a 64-token prompt takes another attention path), not timed.
        model.generate_ids(ids, max_new_tokens=4, stop_at_eos=False)
        if peer is not None:
            bench_transformers(peer, ids, 4, 1)
        # Then the two sides in turns (which goes first alternates), one run at a time: on a
        # shared machine both see the same stretch of load, where all of one side's runs
        # followed by all of the other's compared two different stretches.  A side taking over
        # from the other first runs its warm-up again, untimed: the first pass after the
        # other model's ran 15–25 % slower (each model's 0.5 GB of weights leave the other's
        # out of the caches), and that would fall on whichever side the order favours less.
        row = {"prompt": n, "new": args.new, "dotattn": {}}
        sides = [("dotattn", lambda: bench_dotattn(model, ids, args.new, 1),
                  lambda: model.generate_ids(ids, max_new_tokens=4, stop_at_eos=False))]
        if peer is not None:
            row["transformers"] = {}
            sides.append(("transformers", lambda: bench_transformers(peer, ids, args.new, 1),
                          lambda: bench_transformers(peer, ids, 4, 1, quiet=True)))
        last = "transformers" if peer is not None else "dotattn"  # the side whose warm-up ran last
        for r in range(args.repeats):
            for side, run, warm_up in sides if r % 2 == 0 else sides[::-1]:
                if side != last:
                    warm_up()
                last = side
                for key, values in run().items():
                    row[side].setdefault(key, []).extend(values)
        med = {side: {k: statistics.median(v) for k, v in row[side].items()} for side in ("dotattn", "transformers") if side in row}
        row["median"] = med
        o, p = med["dotattn"], med.get("transformers")
        fmt = lambda x: f"{x:.1f}" if x is not None and x == x else "n/a"  # noqa: E731  (None, NaN: n/a)
        pp, pd = (p["prefill"], p["decode"]) if p else (None, None)
        rp = o["prefill"] / pp if pp else None
        rd = o["decode"] / pd if pd and pd == pd else None
        print(
            f"{n:>7} {args.new:>4} | {fmt(o['prefill']):>16} {fmt(pp):>13} {fmt(rp) + 'x' if rp else 'n/a':>6} | "
            f"{fmt(o['decode']):>15} {fmt(pd):>12} {fmt(rd) + 'x' if rd else 'n/a':>6}",
            flush=True,
        )
        if p and args.repeats > 1:
            row["prefill_pair_ratios"], line = prefill_pairs(row["dotattn"]["prefill"], row["transformers"]["prefill"])
            print("        " + line, flush=True)
        results["rows"].append(row)
    results["load_after"] = uptime()
    print("tokens/s, medians of", args.repeats, "runs; load after:", results["load_after"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
