"""A model's decode-step attention calls at SmolLM2-135M's shape, layer after layer.

One ``KVCache(num_layers=30)`` holding ``--context`` tokens per layer (B 1, Hkv 3, D 64), then
steps of 30 ``KVCache.attend`` calls (Hq 9, one new token each), as SmolLM's decode step makes
them — so the layers' caches do not all sit in the CPU's caches, unlike one call repeated.
Prints the median wall time per call over ``--repeats`` blocks of ``--steps`` steps, the
process CPU time per call, and the K/V read rate::

    PYTHONPATH=src python benchmarks/decode_model_calls.py [--context 512] [--page-size 256]
        [--layout bhld] [--serial] [--stream-mb 425]

``--page-size 0`` uses a contiguous cache; ``--serial`` keeps every call on the calling thread.
``--stream-mb N`` reads an N MB buffer in 30 slices, one between each two calls (a NumPy sum,
not timed), as the model streams its weights between attention calls: the K/V then come from
DRAM, not from the last-level cache (with 30 layers × 6.3 MB at 4k they fit in this machine's
L3 otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=256)
    parser.add_argument("--layout", choices=("bhld", "blhd"), default="bhld")
    parser.add_argument("--serial", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-mb", type=int, default=0)
    args = parser.parse_args(argv)

    from dotattn.decoding import KVCache
    from dotattn.kernels import cpu_decode

    if args.serial:
        cpu_decode.PARALLEL_MIN_BYTES = 1 << 62
    n, B, Hkv, Hq, D, layers = args.context, 1, 3, 9, 64, 30
    rng = np.random.default_rng(0)
    cache = KVCache(batch_size=B, num_kv_heads=Hkv, head_dim=D, capacity=n + args.steps * (args.repeats + 1) + 1,
                    num_layers=layers, page_size=args.page_size or None, layout=args.layout)
    shape = (B, Hkv, n, D) if args.layout == "bhld" else (B, n, Hkv, D)
    for layer in range(layers):
        cache.append(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32), layer=layer)
    one = (lambda h: (B, h, 1, D)) if args.layout == "bhld" else (lambda h: (B, 1, h, D))
    q, k, v = (rng.standard_normal(one(h), dtype=np.float32) for h in (Hq, Hkv, Hkv))

    stream = np.ones((args.stream_mb << 20) // 4, dtype=np.float32) if args.stream_mb else None
    piece = 0 if stream is None else stream.size // layers

    def steps(count):
        """(wall, process CPU) seconds spent in the attend calls of ``count`` steps."""
        wall = cpu = 0.0
        for _ in range(count):
            for layer in range(layers):
                if stream is not None:
                    stream[layer * piece : (layer + 1) * piece].sum()
                t0, c0 = time.perf_counter(), time.process_time()
                cache.attend(q, k, v, layer=layer)
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
        return wall, cpu

    steps(1)
    wall, cpu = [], []
    calls = args.steps * layers
    for _ in range(args.repeats):
        w, c = steps(args.steps)
        wall.append(w / calls)
        cpu.append(c / calls)
    per_call = statistics.median(wall)
    kv_bytes = n * Hkv * 2 * D * 4
    print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"context {n}, {'contiguous' if not args.page_size else f'{args.page_size}-token pages'}, {args.layout}"
          f"{', serial' if args.serial else ''}{f', {args.stream_mb} MB streamed between calls' if stream is not None else ''}: {per_call * 1e6:.0f} µs per call (blocks {min(wall) * 1e6:.0f}–"
          f"{max(wall) * 1e6:.0f}), process CPU {statistics.median(cpu) * 1e6:.0f} µs, K/V read {kv_bytes / per_call / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
