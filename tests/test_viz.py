"""``dotattn.viz.plot_attention`` and ``dotattn viz -o``: bad input refused by name, before any
work (review of 7 Dec 2026: 5-D weights were drawn as RGB images, extra tokens labelled blank
space, a name without ``.png`` was written as another file than the one reported, and bad paths
ended in matplotlib's tracebacks)."""

from __future__ import annotations

import numpy as np
import pytest

from dotattn import cli, viz


def _weights(layers=2, heads=3, L=4):
    w = np.random.default_rng(0).random((layers, heads, L, L))
    return w / w.sum(-1, keepdims=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=_weights()[None]), "weights must have shape (layers, heads, L, L)"),
    (dict(weights=_weights()[0]), "weights must have shape (layers, heads, L, L)"),
    (dict(tokens=list("abcde")), "5 tokens for L = 4"),
    (dict(layers=[-1]), "layers must be indices in [0, 2)"),
    (dict(heads=[3]), "heads must be indices in [0, 3)"),
    (dict(layers=[]), "at least one"),
    (dict(path="noext"), "must name a .png file"),
])
def test_plot_attention_refuses_bad_input(kwargs, message, tmp_path):
    args = dict(tokens=list("abcd"), weights=_weights(), path=tmp_path / "a.png") | kwargs
    if kwargs.get("path") == "noext":
        args["path"] = tmp_path / "noext"
    with pytest.raises(ValueError) as info:
        viz.plot_attention(args.pop("tokens"), args.pop("weights"), args.pop("path"), **args)
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_plot_attention_takes_torch_tensors_of_any_dtype(tmp_path):
    torch = pytest.importorskip("torch")
    w = torch.from_numpy(_weights()).to(torch.bfloat16).requires_grad_()
    path = viz.plot_attention(list("abcd"), w, tmp_path / "t.png", layers=[1], heads=[0, 2])
    assert path == tmp_path / "t.png" and path.stat().st_size > 1000


@pytest.mark.parametrize("output, message, status", [
    ("noext", "-o must name a .png file, got 'noext'", 2),
    ("{tmp}", "-o must name a .png file", 2),
    ("{tmp}/d.png", "is a folder, not a .png file", 2),
])
def test_viz_output_paths_are_checked_before_the_model_loads(output, message, status, tmp_path, capsys, monkeypatch):
    (tmp_path / "d.png").mkdir()
    from dotattn import models

    monkeypatch.setattr(models, "MiniLM", lambda *a: pytest.fail("the model loaded before the path was checked"))
    assert cli.main(["viz", "hello", "-o", output.format(tmp=tmp_path)]) == status
    assert message in capsys.readouterr().err


def test_precompile_with_no_dtype_is_a_usage_error(capsys):
    """``--dtypes ,`` compiled nothing and said "done" with status 0 (review of 7 Dec)."""
    assert cli.main(["precompile", "--dtypes", ","]) == 2
    assert "--dtypes names no dtype" in capsys.readouterr().err
