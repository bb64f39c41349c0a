"""Groups of ranks for the distributed tests: started once per world size, reused by every case.

A :class:`RankPool` starts ``world`` processes of ``ring_worker.py`` joined in a gloo group
on loopback.  No port is guessed: the test process listens on port 0 (the OS picks a free
one) for the workers' command connections, the group meets through a ``FileStore`` in a
fresh temporary folder, and gloo binds its own ephemeral ports — so parallel pytest-xdist
workers never collide.  Every wait has a timeout: a hung rank fails the test and the pool
is killed and restarted for the next one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Listener
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "ring_worker.py"
START_TIMEOUT = 300.0  # s: imports of torch + dotattn in every rank on a heavily loaded machine
CASE_TIMEOUT = 300.0  # generous: these only turn a hang into a failure (load average 20 seen here)


class RankPool:
    def __init__(self, world: int):
        self.world = world
        self.tmp = tempfile.mkdtemp(prefix="dotattn-dist-")
        authkey = secrets.token_hex(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=authkey.encode())
        host, port = self.listener.address
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2] / "src")
        env.update(
            DOTATTN_TEST_AUTHKEY=authkey,
            OMP_NUM_THREADS="1",
            NUMBA_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME="lo",
            PYTHONPATH=src + os.pathsep + env.get("PYTHONPATH", ""),
        )
        self.logs = [open(os.path.join(self.tmp, f"rank{r}.log"), "w+b") for r in range(world)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(r), str(world), os.path.join(self.tmp, "store"), host, str(port)],
                env=env,
                stdout=self.logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        self.conns = [None] * world
        accepted = []

        def accept():
            for _ in range(world):
                accepted.append(self.listener.accept())

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        t.join(START_TIMEOUT)
        if len(accepted) < world:
            self.close()
            raise RuntimeError(f"only {len(accepted)} of {world} ranks connected within {START_TIMEOUT} s{self.tail()}")
        for c in accepted:
            if not c.poll(START_TIMEOUT):
                self.close()
                raise RuntimeError(f"a rank did not join the process group within {START_TIMEOUT} s{self.tail()}")
            kind, rank = c.recv()
            self.conns[rank] = c
        self.broken = False

    def tail(self) -> str:
        out = []
        for r, f in enumerate(self.logs):
            try:
                f.flush()
                f.seek(0)
                text = f.read().decode(errors="replace")[-1500:]
            except (OSError, ValueError):
                continue
            if text.strip():
                out.append(f"\n--- rank {r} ---\n{text}")
        return "".join(out)

    def run(self, name: str, per_rank=None, timeout: float = CASE_TIMEOUT, **kwargs):
        """Run case ``name`` on every rank (``per_rank[r]`` adds rank-specific kwargs); results by rank."""
        for r, c in enumerate(self.conns):
            c.send((name, {**kwargs, **((per_rank or {}).get(r, {}))}))
        results = []
        for r, c in enumerate(self.conns):
            if not c.poll(timeout):
                self.broken = True
                raise AssertionError(f"rank {r} gave no result for {name}{kwargs} within {timeout} s{self.tail()}")
            status, payload = c.recv()
            if status != "ok":
                self.broken = True  # the other ranks may be waiting on the failed one
                raise AssertionError(f"rank {r} failed {name}{kwargs}:\n{payload}")
            results.append(payload)
        return results

    def close(self) -> None:
        for c in self.conns:
            if c is not None:
                c.close()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        self.listener.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def rank_pool():
    """``rank_pool(world)``: a live group of that size, started on first use and kept."""
    pools: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        pool = pools.get(world)
        if pool is not None and pool.broken:
            pool.close()
            pool = None
        if pool is None:
            pool = pools[world] = RankPool(world)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
