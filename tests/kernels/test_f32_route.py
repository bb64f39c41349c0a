"""float32's product route measured per machine (``kernels/f32_route.py``): ``dotattn precompile``
times the split-AMX and MKL routes and stores the faster beside the precompiled kernels; every
process then takes it unless ``DOTATTN_F32_PRODUCTS`` pins a route.  (The suite itself runs
with ``DOTATTN_F32_ROUTE_FILE=none``: tests/conftest.py.)"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from dotattn import cli_precompile, semantics
from dotattn.kernels import _cpu_isa, cpu, f32_route

import helpers as H

AMX = f32_route.available()[0]


@pytest.fixture
def route_file(tmp_path, monkeypatch):
    """The stored choice in a temporary file, read afresh (not the suite's ``none``)."""
    target = tmp_path / "f32_route.json"
    monkeypatch.setenv(f32_route.FILE_ENV_VAR, str(target))
    monkeypatch.delenv(_cpu_isa.F32_PRODUCTS_ENV_VAR, raising=False)
    f32_route.stored.cache_clear()
    yield target
    f32_route.stored.cache_clear()


def _record(route, **changes):
    record = {"cpu": f32_route.cpu_key(), "route": route, "ms": {"amx5": 139.3, "mkl": 105.0}, "rounds": 7,
              "shapes": [[1, 4, 2048, 64], [1, 2, 2048, 128]], "when": "2026-12-01 13:26 UTC", "load": 1.5}
    record.update(changes)
    return record


def test_suite_ignores_any_stored_choice():
    assert os.environ[f32_route.FILE_ENV_VAR] == "none"
    assert f32_route.path() is None and f32_route.read_stored() is None
    assert not f32_route.store(_record("mkl"))


def test_store_then_read_back(route_file):
    assert f32_route.read_stored() is None  # no file yet
    assert f32_route.store(_record("mkl"))
    assert json.loads(route_file.read_text())["route"] == "mkl"
    assert f32_route.stored() == _record("mkl")
    assert "105 ms" in f32_route.describe(f32_route.stored()) and "dotattn precompile" in f32_route.describe(_record("mkl"))


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps([1, 2]), json.dumps(_record("mkl", cpu="another machine")),
     json.dumps(_record("gpu"))],
    ids=["corrupt", "not-a-record", "another-cpu", "unknown-route"],
)
def test_foreign_or_broken_files_are_ignored(route_file, content):
    route_file.write_text(content)
    assert f32_route.read_stored() is None


def test_unwritable_place_is_reported_not_raised(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(f32_route.FILE_ENV_VAR, str(blocker / "f32_route.json"))  # its parent is a file
    assert not f32_route.store(_record("mkl"))


def test_stored_mkl_takes_mkls_tiles_unless_a_route_is_pinned(route_file, monkeypatch):
    q, k, v = H.random_qkv(1, batch=(1,), Hq=2, Lq=300, Lk=300, D=64)
    call = semantics.normalize(q, k, v)
    assert cpu.f32_split_route(call) == AMX  # nothing stored: the split route where AMX runs
    f32_route.store(_record("mkl"))
    on, what = cpu.f32_products_path()
    if AMX:
        assert not on and "faster here than AMX's split products" in what and "precompile" in what
        assert "faster here" in cpu.CpuBackend().description
    assert not cpu.f32_split_route(call)
    monkeypatch.setenv(_cpu_isa.F32_PRODUCTS_ENV_VAR, "amx5")  # a pin wins over the stored choice
    assert cpu.f32_split_route(call) == AMX
    monkeypatch.delenv(_cpu_isa.F32_PRODUCTS_ENV_VAR)
    f32_route.store(_record("amx5"))
    assert cpu.f32_split_route(call) == AMX


def test_results_follow_the_stored_route_bitwise(route_file, monkeypatch):
    """A process with ``mkl`` stored computes exactly what ``DOTATTN_F32_PRODUCTS=mkl`` does."""
    q, k, v = H.random_qkv(2, batch=(1,), Hq=2, Lq=300, Lk=300, D=64)
    f32_route.store(_record("mkl"))
    stored_out = cpu.forward(semantics.normalize(q, k, v))[0]
    monkeypatch.setenv(_cpu_isa.F32_PRODUCTS_ENV_VAR, "mkl")
    H.assert_bitwise_equal(stored_out, cpu.forward(semantics.normalize(q, k, v))[0], "out")


def test_measure_alternates_the_routes_and_picks_the_faster(monkeypatch):
    """Each round times both routes (order flipped every round), the env var restored after."""
    monkeypatch.setenv(_cpu_isa.F32_PRODUCTS_ENV_VAR, "amx")
    now, seen = [0.0], []
    cost = {"amx5": 5.0, "mkl": 3.0}

    def fake_forward(call):
        route = os.environ[_cpu_isa.F32_PRODUCTS_ENV_VAR]
        seen.append(route)
        now[0] += cost[route]
        return np.zeros(1), np.zeros(1)

    monkeypatch.setattr(cpu, "forward", fake_forward)
    monkeypatch.setattr(cpu, "backward", lambda *a, **k: None)
    record = cpu.measure_f32_routes(rounds=3, shapes=[(1, 1, 8, 4)], clock=lambda: now[0])
    assert seen == ["amx5", "mkl", "mkl", "amx5", "amx5", "mkl", "mkl", "amx5"]  # round 0 warms up
    assert record["route"] == "mkl" and record["ms"] == {"amx5": 5000.0, "mkl": 3000.0}
    assert record["cpu"] == f32_route.cpu_key() and record["rounds"] == 3
    assert os.environ[_cpu_isa.F32_PRODUCTS_ENV_VAR] == "amx"


def test_measure_times_the_real_routes():
    if not AMX:  # one float32 route: precompile has nothing to choose
        assert not f32_route.available()[0]
        return
    record = cpu.measure_f32_routes(rounds=1, shapes=[(1, 1, 512, 64), (1, 1, 256, 128)])
    assert record["route"] in f32_route.ROUTES and all(record["ms"][r] > 0 for r in f32_route.ROUTES)
    assert record["shapes"] == [[1, 1, 512, 64], [1, 1, 256, 128]]


def test_precompile_stores_what_it_measured(route_file, monkeypatch, capsys):
    monkeypatch.setattr(f32_route, "available", lambda: (True, "AMX"))
    monkeypatch.setattr(cpu, "measure_f32_routes", lambda: _record("mkl"))
    cli_precompile._measure_f32_route()
    out = capsys.readouterr().out
    assert "mkl (amx5 139 ms, mkl 105 ms" in out and "stored" in out
    assert f32_route.read_stored()["route"] == "mkl"
    monkeypatch.setattr(f32_route, "available", lambda: (False, "float32 sgemm tiles (no AMX)"))
    cli_precompile._measure_f32_route()
    assert "nothing to choose" in capsys.readouterr().out


def test_precompile_skip_route_flag():
    parser = argparse.ArgumentParser()
    cli_precompile.add_arguments(parser)
    assert parser.parse_args(["--skip-route"]).skip_route and not parser.parse_args([]).skip_route


def test_record_stores_the_split_route_only_when_clearly_faster():
    """A near tie stores MKL's tiles: the quarter-size measurement stored amx5 at 203.7 against
    208.4 ms where whole calls ran MKL 7–24 % faster (2 Dec)."""
    assert f32_route.record({"amx5": 203.7, "mkl": 208.4}, 7, f32_route.SHAPES)["route"] == "mkl"
    assert f32_route.record({"amx5": 210.0, "mkl": 200.0}, 7, f32_route.SHAPES)["route"] == "mkl"
    split = f32_route.SPLIT_MARGIN * 200.0 - 1.0
    assert f32_route.record({"amx5": split, "mkl": 200.0}, 7, f32_route.SHAPES)["route"] == "amx5"
