"""The pool-or-alone choice after a moment of a busy machine, old rule against new, in one process.

B8 32k bfloat16 decode calls (as ``dotattn bench --shapes decode``): 20 on a settled size class;
then N processes spin for 1 s (argv[2]; 2 = both cores) while three pool calls run (the first,
after a 0.1 s sleep, is not timed by the choice) and the calls stop — a bench row's end, or a
model between requests; after the spinners end and a 0.5 s pause, 15 calls.  The old choice
(``ParallelChoice`` before commit c8a5aee, read from OLD_SRC: retry every 32 calls, three kept
times) and the shipped one alternate, each with its own classes; per phase the median ms and
the calls run alone.  Usage (under the bench lock)::

    python benchmarks/decode_choice_moment.py ROUNDS SPINNERS [OLD_SRC]

OLD_SRC: a file holding the old ``class ParallelChoice``; default: cut from
``git show c8a5aee~1:src/dotattn/kernels/cpu_decode.py`` in this repository.
"""
import sys, time, subprocess, statistics
import numpy as np
try:
    import torch  # noqa: F401  (loaded first, as in the bench)
except ImportError:
    pass
from dotattn.kernels import cpu_decode as cd
from dotattn import bench_decode as bd
import dotattn
ns = {'time': time, '_median': cd._median}
def old_source() -> str:
    if len(sys.argv) > 3:
        return open(sys.argv[3]).read()
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = subprocess.run(["git", "-C", repo, "show", "c8a5aee~1:src/dotattn/kernels/cpu_decode.py"],
                          check=True, capture_output=True, text=True).stdout
    return text[text.index("class ParallelChoice:"):text.index("def _median")]


exec(old_source(), ns)
class OldC(ns['ParallelChoice']):
    __slots__ = ('counts',)
    def __init__(self): super().__init__(); self.counts = [0, 0]
    def record(self, pool, per_byte): self.counts[int(pool)] += 1; super().record(pool, per_byte)
choices = {'old': OldC, 'new': cd.ParallelChoice}
B, L = 8, 32768; dt = bd._np_dtype('bfloat16'); rng = np.random.default_rng(0)
kc = rng.standard_normal((B, 8, L, 128), dtype=np.float32).astype(dt)
vc = rng.standard_normal((B, 8, L, 128), dtype=np.float32).astype(dt)
q = rng.standard_normal((B, 32, 1, 128), dtype=np.float32).astype(dt)
lengths = np.full(B, L)
run = lambda: dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths)
def load(): return open('/proc/loadavg').read().split()[0]
def phase(n=None, until=None):
    ts, al = [], 0
    while (n is not None and len(ts) < n) or (until is not None and until.poll() is None):
        a0 = cd.mode_counts()[0]; t = time.perf_counter(); run(); ts.append(1e3 * (time.perf_counter() - t)); al += cd.mode_counts()[0] - a0
    return ts, al
for r in range(int(sys.argv[1])):
    for name in (('old', 'new') if r % 2 == 0 else ('new', 'old')):
        cd.ParallelChoice = choices[name]; cd._CHOICES.clear()
        l0 = load()
        before, a_b = phase(20)
        sps = [subprocess.Popen([sys.executable, '-c', 'import time\ne=time.time()+1\nwhile time.time()<e: pass']) for _ in range(int(sys.argv[2]))]; sp = sps[0]
        time.sleep(0.1)
        during, a_d = phase(3)  # three pool calls in the moment (the first, after the sleep, not timed), then the calls stop (a row's end)
        for p in sps: p.wait()
        time.sleep(0.5)  # a pause after the moment (between rows; between a model's requests)
        after, a_a = phase(15)
        seq = ''.join('A' if x > 90 else 'P' for x in after)
        print(f"{name}: load {l0}->{load()}  before {statistics.median(before):.1f} ms (alone {a_b}/20)  during {statistics.median(during):.1f} ({a_d}/{len(during)})  "
              f"after {statistics.median(after):.1f} (alone {a_a}/15; first 8: {statistics.median(after[:8]):.1f})  {' '.join('%.0f' % x for x in after)}", flush=True)
