"""dotattn in processes forked from one that ran it (``kernels/_forked.py``).

Numba's parallel kernels run on GNU OpenMP, which is not fork-safe, and Numba's layer ends a
forked child at its first parallel kernel ("Terminating: fork() called from a process already
using GNU OpenMP, this is unsafe.").  A multiprocessing pool with the "fork" start method
(Linux's default before Python 3.14), a preforking server or PyTorch's DataLoader workers that
call dotattn after their parent did were killed, and the pool waited for them forever.  Now
such a child runs the same work without Numba's team — the same bits as its parent.
Checked in a fresh process each (the parent must have run the team first).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("numba")

SCRIPT = r"""
import hashlib, multiprocessing as mp, os, sys
import numpy as np
import dotattn

def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 4, 512, 64), dtype=np.float32) for _ in range(3))
kc = rng.standard_normal((1, 8, 4096, 128), dtype=np.float32)
qd = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)

def band(b, h, i, j):
    return abs(i - j) <= 64

def work():
    out, lse = dotattn.attention(q, k, v, causal=True, return_lse=True, implementation="cpu")  # a team forward
    grads = dotattn.attention_backward(q, k, v, out, lse, out, causal=True, implementation="cpu")
    _, weights = dotattn.attention(q[:, :, :300], k, v, return_weights=True, implementation="cpu")
    tiles = dotattn.block_mask(band, None, None, 512, 512)  # its tiles classified by a parallel kernel
    decoded = dotattn.attention_with_kvcache(qd, kc, kc, cache_lengths=np.array([4000]))
    return digest(out, lse, *grads, weights, np.asarray(tiles.classes), decoded)

def run(target, *args):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(queue,) + args)
    p.start()
    try:
        result = queue.get(timeout=240)
    except Exception:
        result = None
    p.join(60)
    return result if p.exitcode == 0 else f"exit {p.exitcode}"

def grandchild(queue):
    queue.put(work())

def child(queue):
    here = work()
    from dotattn.kernels import _cpu_kernels
    stats = _cpu_kernels._forward_chunk.stats  # the one-thread entry: loaded (dotattn precompile), not compiled
    print("ENTRY", sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), flush=True)
    queue.put((here, run(grandchild)))

parent = work()
print("PARENT", parent)
for _ in range(2):
    got = run(child)
    here, below = got if isinstance(got, tuple) else (got, got)
    print("CHILD", here)
    print("GRANDCHILD", below)
"""


def test_forked_children_and_grandchildren_run_with_their_parents_bits():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Terminating" not in done.stderr, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["PARENT"], ["CHILD"], ["GRANDCHILD"])]
    parent = [d for kind, d in lines if kind == "PARENT"]
    assert len(parent) == 1 and len(lines) == 5, done.stdout
    assert all(d == parent[0] for _, d in lines), done.stdout
    entries = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("ENTRY")]
    assert entries and all(hits != "0" and misses == "0" for hits, misses in entries), done.stdout


MODELS = r"""
import multiprocessing as mp
import numpy as np
from dotattn.models import MiniLM, SmolLM

smol, mini = SmolLM(), MiniLM()
prompt = smol.encode("Name three planets.")
long_prompt = smol.encode("word " * 300)  # a long prompt pass: products on all cores in the parent
sentences = ["How do I make pizza dough?", "Knead the dough for ten minutes."] * 4

def work():
    ids = smol.generate_ids(prompt, max_new_tokens=8, stop_at_eos=False)
    return ids, int(smol.logits(long_prompt)[-1].argmax()), mini.encode(sentences)

parent = work()

def child(queue):
    queue.put(work())

ctx = mp.get_context("fork")
queue = ctx.Queue()
p = ctx.Process(target=child, args=(queue,))
p.start()
got = queue.get(timeout=240)
p.join(60)
ids, top, emb = got
print("EXIT", p.exitcode)
print("IDS", ids == parent[0], "TOP", top == parent[1], "EMB", float(np.abs(emb - parent[2]).max()))
"""


def test_the_models_run_in_a_forked_child():
    """SmolLM's products and MiniLM's torch layers (torch's own OpenMP team, which waits forever in
    a forked child) run on one thread / in NumPy there: the same tokens, embeddings within 1e-6."""
    pytest.importorskip("torch")
    from dotattn.models import default_model_path

    try:
        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    done = subprocess.run([sys.executable, "-c", MODELS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines.get("EXIT") == "0", done.stdout
    ids, top, emb = lines["IDS"].split()[0], lines["IDS"].split()[2], float(lines["IDS"].split()[4])
    assert ids == "True" and top == "True" and emb < 1e-6, done.stdout
