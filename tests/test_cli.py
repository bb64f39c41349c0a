"""``dotattn info``: the backends in dispatch order, as a table and as JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dotattn
from dotattn import cli, registry


def test_info_table(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"dotattn {dotattn.__version__}")
    lines = text.splitlines()[1:]
    assert [line.split()[0] for line in lines] == registry.names()
    for row, line in zip(dotattn.info(), lines):
        assert line.split()[1] == ("yes" if row["available"] else "no")
        assert row["status"] in line


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == dotattn.__version__
    assert [b["name"] for b in data["backends"]] == registry.names()
    assert {"reference", "numpy"} <= {b["name"] for b in data["backends"] if b["available"]}
    assert all(set(b) == {"name", "available", "status"} for b in data["backends"])


def test_info_entry_point_runs_without_frameworks():
    code = (
        "import sys; from dotattn.cli import main; rc = main(['info', '--json']); "
        "print([m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules], file=sys.stderr); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backends"][0]["name"] == registry.names()[0]
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_ctrl_c_ends_a_command_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C during a subcommand (a model loading, a bench running) exits 130 with one line."""
    from dotattn import cli_info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_info, "run", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "\ndotattn: interrupted\n"


def test_unknown_subcommand_exits_with_usage(capsys):
    try:
        cli.main(["nonsense"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse should reject an unknown subcommand")
    assert "invalid choice" in capsys.readouterr().err


def _children(pid: int) -> dict[int, str]:
    """The live (not zombie) processes whose parent is ``pid``: their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="workers ending with their parent: Linux's PR_SET_PDEATHSIG, and a pool needs two cores")
def test_a_killed_precompile_leaves_no_worker_compiling(tmp_path):
    # `dotattn precompile` compiles each dtype in a worker process; killed (SIGKILL: no clean-up
    # of its own), its workers must end too rather than compile on for minutes, orphaned
    env = dict(os.environ, DOTATTN_PRECOMPILED_DIR=str(tmp_path / "kernels"), NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    code = "import sys; from dotattn.cli import main; sys.exit(main(['precompile', '--dtypes', 'float32,float64', '--skip-route']))"
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers = {}
        while time.monotonic() < deadline and len(workers) < 2:
            workers = {p: c for p, c in _children(parent.pid).items() if "spawn_main" in c}
            time.sleep(0.2)
        assert len(workers) == 2, _children(parent.pid)
        time.sleep(2)  # the workers past their start, compiling
        assert all(_alive(p) for p in workers)
    finally:
        parent.kill()
        parent.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:  # (a failing run cleans up after itself)
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers still running after their parent was killed: {left}"
