"""MiniLM on dotattn vs sentence-transformers' own embeddings (tests/data/minilm_reference.npz,
made by scripts/make_minilm_reference.py in a separate environment)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the 'models' extra is not installed")
pytest.importorskip("tokenizers", reason="the 'models' extra is not installed")

from dotattn import AttentionTypeError, AttentionValueError  # noqa: E402
from dotattn.models import MiniLM, default_model_dir  # noqa: E402
from dotattn.models.minilm import _erf  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.npz"
TOLERANCE = 1e-4  # the bound on max |ours − sentence-transformers|


def _model_dir() -> Path:
    try:
        return default_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model() -> MiniLM:
    _model_dir()
    return MiniLM()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE, allow_pickle=False) as data:
        return [str(s) for s in data["sentences"]], data["embeddings"], int(data["max_seq_length"])


def _report(ours: np.ndarray, ref: np.ndarray) -> str:
    diff = np.abs(ours - ref)
    idx = np.unravel_index(np.argmax(diff), diff.shape)
    return f"max |diff| {diff.max():.3g} at {idx}: ours {ours[idx]:.7f}, reference {ref[idx]:.7f}"


def test_embeddings_match_sentence_transformers(model, reference):
    sentences, ref, _ = reference
    ours = model.encode(sentences)
    assert ours.shape == (len(sentences), 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOLERANCE, _report(ours, ref)


@pytest.mark.parametrize("implementation", ["cpu", "numpy", "reference"])
def test_embeddings_match_on_each_numpy_backend(model, reference, implementation):
    sentences, ref, _ = reference
    forced = MiniLM(model.folder, implementation=implementation)
    ours = forced.encode(sentences[:4])
    assert np.abs(ours - ref[:4]).max() <= TOLERANCE, _report(ours, ref[:4])


def test_batching_and_order_do_not_change_embeddings(model, reference):
    sentences, ref, _ = reference
    one_by_one = np.concatenate([model.encode([s]) for s in sentences])
    reversed_batch = model.encode(sentences[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(one_by_one, ref, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(reversed_batch, one_by_one, atol=1e-5, rtol=0)


def test_embeddings_are_unit_length_and_semantic(model):
    emb = model.encode(["A man is eating food.", "A man eats a meal.", "The stock market fell sharply."])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > 0.6 > emb[0] @ emb[2]


def test_truncates_to_max_seq_length(model, reference):
    sentences, _, max_len = reference
    batch = model.tokenize([sentences[-1]])
    assert model.max_seq_length == max_len == 256
    assert batch.ids.shape == (1, max_len) and batch.tokens[0][0] == "[CLS]" and batch.tokens[0][-1] == "[SEP]"


def test_forward_returns_each_layers_weights(model):
    batch = model.tokenize(["short", "a somewhat longer sentence here"])
    states, weights = model.forward(batch, return_weights=True)
    L = batch.ids.shape[1]
    assert states.shape == (2, L, 384)
    assert len(weights) == 6 and all(w.shape == (2, 12, L, L) for w in weights)
    n0 = int(batch.lengths[0])
    # Rows of real tokens sum to 1 over real keys; keys and rows past the length get 0.
    np.testing.assert_allclose(weights[0][0, :, :n0].sum(-1), 1.0, atol=1e-5)
    assert not weights[0][0, :, :, n0:].any() and not weights[0][0, :, n0:].any()


def test_empty_input_and_single_string(model):
    assert model.encode([]).shape == (0, 384)
    np.testing.assert_allclose(model.encode("Hi"), model.encode(["Hi"]))


def test_bad_inputs_name_the_problem(model, tmp_path):
    with pytest.raises(TypeError, match="sentences must be strings.*int at index 1"):
        model.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size must be an int ≥ 1, got 0"):
        model.encode(["ok"], batch_size=0)
    with pytest.raises(FileNotFoundError, match="lacks config.json, model.safetensors, tokenizer.json"):
        MiniLM(tmp_path)


def test_loads_from_a_copied_folder(model, tmp_path):
    src = _model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(src / name, tmp_path / name)
    copy = MiniLM(tmp_path)
    # Without sentence_bert_config.json the limit falls back to the position table's size.
    assert copy.max_seq_length == json.loads((src / "config.json").read_text())["max_position_embeddings"]
    np.testing.assert_allclose(copy.encode(["Hi there"]), model.encode(["Hi there"]), atol=1e-6)


def test_erf_matches_math_erf():
    import math

    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    want = np.array([math.erf(float(t)) for t in x])
    # A&S 7.1.26's own bound (1.5e-7) plus float32 rounding of the polynomial.
    assert np.abs(_erf(x) - want).max() < 5e-7


@pytest.mark.parametrize("compute", ["torch", "numpy"])
def test_both_compute_paths_match_sentence_transformers(model, reference, compute):
    """Projections in torch (the default where installed) or NumPy: the same embeddings."""
    if compute == "torch":
        pytest.importorskip("torch")
    sentences, ref, _ = reference
    other = MiniLM(model.folder, compute=compute)
    assert other.compute == compute
    ours = other.encode(sentences[:5], batch_size=2)
    assert np.abs(ours - ref[:5]).max() <= TOLERANCE, _report(ours, ref[:5])
    states, weights = other.forward(other.tokenize(sentences[:2]), return_weights=True)
    assert isinstance(states, np.ndarray) and all(isinstance(w, np.ndarray) for w in weights)


def test_sentences_that_are_not_strings_or_not_unicode_are_refused_by_name(model):
    """tokenize() took a string as its characters; None or an int reached Python's iteration
    ("'NoneType' object is not iterable"), and a lone surrogate the tokenizer's TypeError."""
    assert model.tokenize("hello").ids.shape[0] == 1  # one sentence, as encode("hello")
    for call in (model.encode, model.tokenize):
        for bad in (None, 5):
            with pytest.raises(AttentionTypeError, match="sentences must be a string or a sequence of strings"):
                call(bad)
        with pytest.raises(AttentionTypeError, match="sentences must be strings, got NoneType at index 1"):
            call(["a", None])
        with pytest.raises(AttentionValueError, match=r"sentences\[1\] holds a lone surrogate '\\ud800' at index 2"):
            call(["ok", "ab\ud800c"])
    assert model.encode(["a", "b", "c"], batch_size=np.int64(2)).shape == (3, 384)


def test_bad_compute_is_refused():
    with pytest.raises(ValueError, match="compute must be None, 'torch' or 'numpy', got 'jax'"):
        MiniLM(_model_dir(), compute="jax")
