"""Windows and documents against compiled FlexAttention, with fixed-tile variants of ours (issue 13 §2).

Usage: PYTHONPATH=src python benchmarks/sparse_flex_ab.py [--repeats 9] [--tiles 128x128]
       [--cases window256-h8-n4096-d64,docs8-h8-n4096-d64]

Peers in rounds (`bench.measure_case`: every peer once per round, order shuffled): ``dotattn-cpu``
(the backend's own tile choice), ``cpu-<BQ>x<BK>`` (``cpu.forward`` with that fixed tile,
e.g. the 128 × 128 of 1 Dec) and ``torch-flex``.  Prints each peer's median and Flex / peer.
"""

from __future__ import annotations

import argparse

from dotattn import bench, semantics
from dotattn.kernels import cpu


def fixed_tiles_peer(bs):
    def factory(case, x):
        opts = bench._dotattn_options(case)
        call = semantics.normalize(x["q"], x["k"], x["v"], **opts)
        return lambda: cpu.forward(call, block_size=bs)

    return factory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--tiles", default="128x128")
    ap.add_argument("--cases", default="window256-h8-n4096-d64,docs8-h8-n4096-d64")
    ap.add_argument("--no-flex", action="store_true", help="our peers only (more rounds in the same time)")
    a = ap.parse_args()
    peers = ["dotattn-cpu"]
    for t in filter(None, a.tiles.split(",")):
        bs = tuple(int(s) for s in t.split("x"))
        bench.register_peer(f"cpu-{t}", fixed_tiles_peer(bs))
        peers.append(f"cpu-{t}")
    if not a.no_flex:
        peers.append("torch-flex")
    cases = {c.name: c for c in bench.SHAPE_SETS["issue"]()}
    for name in a.cases.split(","):
        case = cases[name]
        rows = bench.measure_case(case, peers, bench._inputs(case), a.repeats)
        flex = next((r for r in rows if r.peer == "torch-flex"), rows[0])
        for r in rows:
            what = "flex" if flex.peer == "torch-flex" else flex.peer
            ratio = "" if r.ms is None or flex.ms is None else f"  {what}/peer {flex.ms / r.ms:.2f}"
            ms = "n/a" if r.ms is None else f"{r.ms:.1f} ms"
            print(f"{name:24s} {r.peer:14s} {ms}{ratio}", flush=True)


if __name__ == "__main__":
    main()
