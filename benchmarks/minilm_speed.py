"""MiniLM sentence encoding on dotattn vs sentence-transformers, same sentences, same process.

dotattn's MiniLM runs twice, with torch and with NumPy projections (``MiniLM(compute=…)``;
the default is torch where installed).  All encoders get the same ``--sentences`` generated sentences (seeded, 4–40 words, so
batches hold real padding) and the same ``--batch-size``; each runs one warm-up pass, then
``--repeats`` timed passes over all sentences; the table shows the median sentences/s and
dotattn's throughput relative to sentence-transformers (above 1 = dotattn faster).  The
largest |difference| between the two sets of embeddings is printed as a sanity check.

    .venv/bin/python benchmarks/minilm_speed.py
    .venv/bin/python benchmarks/minilm_speed.py --sentences 512 --batch-size 64 --json

sentence-transformers is optional: without it (or without torch) its row shows ``n/a`` and
the reason.  The load average is printed: on a shared machine compare the ratio, not the
absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this be "
    "or has had not but have they their one all been its new after who more also first two other "
    "time can year would people there city world over some when into state during most only many "
    "river music film game team school water light house market street small large early history "
    "music between three under several known while later since against around within government"
).split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(4, 41)))
        out.append(" ".join(words).capitalize() + ".")
    return out


def _time(encode, sentences, repeats: int) -> tuple[float, list[float], np.ndarray]:
    emb = encode(sentences)  # warm-up: compiles, loads caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb = encode(sentences)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, np.asarray(emb, dtype=np.float32)


def run(n: int, batch_size: int, repeats: int) -> dict:
    from dotattn.models import MiniLM, default_model_dir

    sentences = make_sentences(n)
    rows = []
    ours = None
    for compute in ("torch", "numpy"):
        try:
            model = MiniLM(compute=compute)
        except ImportError as exc:
            rows.append(dict(peer=f"dotattn MiniLM ({compute} projections)", status="n/a", reason=str(exc)))
            continue
        med, times, emb = _time(lambda s: model.encode(s, batch_size=batch_size), sentences, repeats)
        ours = emb if ours is None else ours
        rows.append(
            dict(peer=f"dotattn MiniLM ({compute} projections)", status="ok", s=med, times_s=times, sentences_per_s=n / med)
        )
    theirs = None
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        rows.append(dict(peer="sentence-transformers", status="n/a", reason=f"not installed: {exc}"))
    else:
        st = SentenceTransformer(str(default_model_dir()), device="cpu")
        med, times, theirs = _time(
            lambda s: st.encode(s, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True),
            sentences,
            repeats,
        )
        rows.append(
            dict(
                peer=f"sentence-transformers (torch {torch.__version__}, {torch.get_num_threads()} threads)",
                status="ok",
                s=med,
                times_s=times,
                sentences_per_s=n / med,
            )
        )
    result = dict(
        sentences=n,
        batch_size=batch_size,
        repeats=repeats,
        load_average=os.getloadavg(),
        rows=rows,
        ratio=None,
        ratio_peer=None,
        max_abs_diff=None,
    )
    if theirs is not None and ours is not None:
        best = next(r for r in rows if r["status"] == "ok")  # the default: torch projections where installed
        result["ratio"] = best["sentences_per_s"] / rows[-1]["sentences_per_s"]
        result["ratio_peer"] = best["peer"]
        result["max_abs_diff"] = float(np.abs(ours - theirs).max())
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.sentences, args.batch_size, args.repeats)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    print(f"{result['sentences']} sentences, batch size {result['batch_size']}, median of {result['repeats']} (load {load})")
    for r in result["rows"]:
        if r["status"] != "ok":
            print(f"  {r['peer']:<60} n/a  {r['reason']}")
        else:
            print(f"  {r['peer']:<60} {r['sentences_per_s']:8.1f} sentences/s  ({r['s'] * 1e3:.0f} ms)")
    if result["ratio"] is not None:
        print(f"  {result['ratio_peer']} / sentence-transformers throughput: {result['ratio']:.2f}×")
        print(f"  max |embedding difference|: {result['max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
