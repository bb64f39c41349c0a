"""`dotattn demo translate`: the date data, the packed model on dotattn.torch layers, the picture."""

from __future__ import annotations

import argparse
import calendar
import datetime

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the 'torch' extra is not installed")
pytest.importorskip("matplotlib", reason="the 'cli' extra is not installed")
pytest.importorskip("rich", reason="the 'cli' extra is not installed")

from dotattn.demo import translate as tr  # noqa: E402
from dotattn.kernels._cpu_isa import mkl_threads_here  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ordinals_and_sentences():
    words = [tr.ordinal_words(d) for d in range(1, 32)]
    assert len(set(words)) == 31
    assert words[0] == "first" and words[11] == "twelfth" and words[19] == "twentieth"
    assert words[23] == "twenty-fourth" and words[29] == "thirtieth" and words[30] == "thirty-first"
    assert [tr.ordinal_digits(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"
    ]
    assert tr.spell(2026, 11, 24, 0) == "twenty-fourth of november 2026"
    assert tr.spell(2026, 11, 24, 1) == "november twenty-fourth, 2026"
    assert tr.spell(2026, 11, 24, 2) == "the 24th day of november, 2026"
    assert tr.source_tokens("the 24th day of november, 2026") == [
        "the", "2", "4", "th", "day", "of", "november", ",", "2", "0", "2", "6"
    ]


def test_every_date_tokenizes_into_the_vocabulary():
    for year in (1900, 2024):
        for month in range(1, 13):
            for day in range(1, calendar.monthrange(year, month)[1] + 1):
                for form in range(3):
                    assert all(t in tr.SRC_INDEX for t in tr.source_tokens(tr.spell(year, month, day, form)))


def test_targets_are_iso_dates_and_held_out_dates_never_train():
    rng = np.random.default_rng(0)
    train_dates = tr.sample_dates(rng, 500, held_out=False)
    test_dates = tr.sample_dates(rng, 200, held_out=True)
    assert not {d[:3] for d in train_dates} & {d[:3] for d in test_dates}
    for (y, m, d, _), row in zip(test_dates, tr.target_ids(test_dates)):
        assert row[0] == tr.BOS and row[-1] == tr.EOS
        text = "".join(tr.TGT_VOCAB[t] for t in row[1:-1])
        assert datetime.date.fromisoformat(text) == datetime.date(y, m, d)
    every_day = [
        (y, m, d) for y in range(2000, 2004) for m in range(1, 13) for d in range(1, calendar.monthrange(y, m)[1] + 1)
    ]
    share = np.mean([tr.is_held_out(*x) for x in every_day])
    assert 0.07 < share < 0.13


def test_packing_keeps_sentences_apart():
    packed = tr.Packed.of([[5, 6, 7], [8], [9, 10]])
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed.pos.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.lengths() == [3, 1, 2]


def test_packed_model_equals_one_sentence_at_a_time():
    """Packing is only a speed trick: each sentence's logits are those it gets alone."""
    torch.manual_seed(0)
    model = tr.build_model().eval()
    dates = [(2026, 11, 24, 0), (1969, 7, 20, 1), (2001, 9, 3, 2)]
    tgt = tr.target_ids(dates)[:, :-1]
    src = tr.Packed.of(tr.source_ids(dates))
    with torch.no_grad():
        together = model.decode(tr.Packed.of(tgt.tolist()), model.encode(src), src)[0]
        for i, date in enumerate(dates):
            one = tr.Packed.of(tr.source_ids([date]))
            alone = model.decode(tr.Packed.of(tgt[i : i + 1].tolist()), model.encode(one), one)[0]
            n = tgt.shape[1]
            torch.testing.assert_close(together[i * n : (i + 1) * n], alone, atol=1e-5, rtol=1e-5)


def test_a_training_step_sends_gradients_through_every_attention():
    torch.manual_seed(0)
    model = tr.build_model()
    dates = tr.sample_dates(np.random.default_rng(1), 8, held_out=False)
    src = tr.Packed.of(tr.source_ids(dates))
    tgt = torch.from_numpy(tr.target_ids(dates))
    logits = model.decode(tr.Packed.of(tgt[:, :-1].tolist()), model.encode(src), src)
    torch.nn.functional.cross_entropy(logits[0], tgt[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        if "attn" in name and name.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("translate")
    threads = torch.get_num_threads()
    mkl_local = mkl_threads_here(0)  # none set on this thread during the run (0), as in a fresh process
    try:
        result = tr.run_translate(argparse.Namespace(out=str(out), quick=True, seed=0))
    finally:
        mkl_after = mkl_threads_here(mkl_local)
    result["threads_before_after"] = (threads, torch.get_num_threads())
    result["mkl_local_after"] = mkl_after
    return result


def test_quick_run_writes_the_picture_and_reports(quick_result):
    data = quick_result["png"].read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert quick_result["steps"] == 30 and np.isfinite(quick_result["loss"])
    assert 0.0 <= quick_result["accuracy"] <= 1.0
    for date, w in zip(quick_result["examples"], quick_result["weights"]):
        assert w.shape == (tr.TARGET_LEN, len(tr.source_tokens(tr.spell(*date))))
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)  # each character reads only its sentence
    before, after = quick_result["threads_before_after"]
    assert before == after  # the demo's one-thread setting does not leak into the caller
    if quick_result["mkl_local_after"] is not None:  # nor does the thread-local MKL count torch's setter sets
        assert quick_result["mkl_local_after"] == 0


@pytest.mark.slow
def test_full_run_reaches_95_percent(tmp_path):
    result = tr.run_translate(argparse.Namespace(out=str(tmp_path), quick=False, seed=0))
    assert result["accuracy"] >= 0.95, result["accuracy"]
