"""``dotattn info``: the backends in dispatch order, as a table and as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_unknown_subcommand_exits_with_usage(capsys):
    try:
        cli.main(["nonsense"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse should reject an unknown subcommand")
    assert "invalid choice" in capsys.readouterr().err
