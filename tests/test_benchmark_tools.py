"""The A/B and cache tools of benchmarks/: the checks that keep a tree A/B honest.

``cpu_ab_trees.py`` warns when the two trees' float32 calls take different product routes
(a tree without the stored ``f32_route.json`` takes the split-AMX route: 1 Dec's "first-call
compiled kernels run slower" was that), and says whether both gave the same bits.
``generate.py`` pairs each of our prompt passes with the peer's of the same round.
``cpu_cache_compare.py`` compares two kernel caches' machine code with the names that change
from process to process normalized.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_trees_warns_when_the_float32_routes_differ():
    ab = _load("cpu_ab_trees")
    stored = {"f32_products": ["sgemm", "float32 sgemm tiles, faster here"], "bits": {"bwd64": "a"}}
    default = {"f32_products": ["split-AMX", "AMX split products"], "bits": {"bwd64": "b"}}
    warning = ab.route_warning({"old": stored, "new": default}, "float32")
    assert warning is not None and "old: sgemm" in warning and "new: split-AMX" in warning
    assert "DOTATTN_F32_PRODUCTS" in warning
    assert ab.route_warning({"old": stored, "new": dict(stored)}, "float32") is None
    assert ab.route_warning({"old": stored, "new": default}, "bfloat16") is None
    assert ab.route_warning({"old": {}, "new": {}, "sdpa": {}}, "float32") is None


def test_ab_trees_says_whether_the_bits_agree():
    ab = _load("cpu_ab_trees")
    infos = {"old": {"bits": {"x": "1", "y": "2"}}, "new": {"bits": {"x": "1", "y": "3"}}}
    assert ab.bits_note(infos, "x") == "; same bits"
    assert ab.bits_note(infos, "y") == "; bits differ"
    assert ab.bits_note({"old": {"bits": {"z": None}}, "new": {"bits": {"z": None}}}, "z") == ""


def test_cache_compare_normalizes_what_changes_between_processes():
    cc = _load("cpu_cache_compare")
    # the same function compiled in two processes: Numba's version numbers, its ABI tag (the
    # flags, whose set order follows string hashing) and a parfor gufunc's address differ
    a = ("  3c6: R_X86_64_64\t__gufunc__._ZN13_3cdynamic_3e36__numba_parfor_gufunc_0x7fc6a6482ed0"
         "B4v230B116c8tJTC_2fWQAliW1xhDEoY6EEMEUOEMISPGsAQ")
    b = ("  3c6: R_X86_64_64\t__gufunc__._ZN13_3cdynamic_3e36__numba_parfor_gufunc_0x7f001cbf8610"
         "B4v170B112c8tJTC_2fWQAliW1xhDEoY6EEMEUOEMISPGs")
    assert cc.normalize(a) == cc.normalize(b)
    assert cc.normalize(".bytes.-5339273718270852447") == cc.normalize(".bytes.7944219306076106257")
    code = ["  10:\tvmovups (%rax),%zmm0", "  16:\tvfmadd231ps %zmm1,%zmm2,%zmm0"]
    assert cc.compare(code, list(code)) == ("same", [])
    moved = ["  20: R_X86_64_64\t.lrodata+0x7b0"], ["  20: R_X86_64_64\t.lrodata+0x7c0"]
    assert cc.compare(code + moved[0], code + moved[1])[0] == "same instructions"
    assert cc.compare(code, [code[0], "  16:\tvfmadd231ps %ymm1,%ymm2,%ymm0"])[0] == "DIFFERS"
    assert cc.compare(code, code[:1])[0] == "DIFFERS"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_cache_compare_finds_a_cache_equal_to_itself():
    from dotattn.kernels import _cpu_cache

    cache = str(_cpu_cache.PRECOMPILED_DIR)
    run = subprocess.run([sys.executable, str(BENCHMARKS / "cpu_cache_compare.py"), cache, cache, "--only", "_cpu_kernels._simple-"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "DIFFERS: 0" in run.stdout


def test_generate_pairs_prefill_runs_round_by_round():
    gen = _load("generate")
    pairs, line = gen.prefill_pairs([600.0, 500.0, 700.0], [500.0, 625.0, 700.0])
    assert pairs == pytest.approx([1.2, 0.8, 1.0])
    assert "median 1.000" in line and "0.800–1.200" in line and "ours ahead in 2 of 3" in line
    with pytest.raises(ValueError, match="one peer run per run of ours"):
        gen.prefill_pairs([600.0], [])


def test_decode_ab_takes_the_imported_kernels_file_as_new(capsys):
    # a second module from the package's own kernel file would save Numba entries under the
    # package's cache locator that name the copy's module: a later process failed to load them
    from dotattn.kernels import cpu_decode

    ab = _load("decode_ab")
    before = set(sys.modules)
    mods = ab.kernel_versions([cpu_decode.K.__file__, "new"])
    assert mods == {"new": cpu_decode.K}
    assert "the imported kernels themselves; run as 'new'" in capsys.readouterr().err
    assert not [m for m in set(sys.modules) - before if m.startswith("dotattn.kernels._dk_")]


def test_decode_layers_times_both_peers_on_every_layer():
    # the model-pattern decode benchmark: a row per context with both peers' times and their
    # ratio, after checking that the two agree (its assertion fails the run otherwise)
    pytest.importorskip("torch")
    import re

    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "decode_layers.py"), "float32", "16,40", "--layers=3", "--rounds=2",
         "--shape=4,2,32", "--weights-mb=0.25", "--repeat"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "Hq 4 Hkv 2 D 32, 3 layers, weights 0.25 MiB a layer" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+(16|40)\s", line)]
    assert [r[0] for r in rows] == ["16", "40"]
    for r in rows:
        ours, sdpa, ratio = float(r[3]), float(r[4]), float(r[5])  # (µs after the products' own time)
        if ours > 0 and sdpa > 0:
            assert abs(ratio - sdpa / ours) < 0.01 + 0.01 * ratio


def test_generate_names_the_transformers_peers_attention(monkeypatch):
    """generate.py's transformers peer runs float32 with torch SDPA named explicitly (not left to
    transformers' default), and its line says which attention and dtype it runs.

    transformers is a peer of that script only, not an extra ``make test`` installs: a stand-in
    module records what the loader asks of ``from_pretrained`` (no skip, no download)."""
    import types

    torch = pytest.importorskip("torch")
    gen = _load("generate")
    asked = {}

    def from_pretrained(folder, **kwargs):
        asked.update(kwargs, folder=folder)
        model = torch.nn.Linear(2, 2).to(kwargs["dtype"])
        model.config = types.SimpleNamespace(_attn_implementation=kwargs.get("attn_implementation"))
        return model

    fake = types.ModuleType("transformers")
    fake.__version__ = "0.test"
    fake.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=from_pretrained)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    model, info = gen.load_transformers(Path("/models/smol.gguf"))
    assert model is not None, info
    assert asked["attn_implementation"] == "sdpa" and asked["dtype"] == torch.float32
    assert asked["folder"] == "/models" and asked["gguf_file"] == "smol.gguf"
    assert "attention sdpa" in info and "torch.float32" in info and "transformers 0.test" in info
