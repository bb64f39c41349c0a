"""The commands' input and output where deployments differ from a UTF-8 terminal: a stdout that
cannot encode ``—`` or ``×`` (``LC_ALL=C``, ``PYTHONIOENCODING=ascii``), text that is not valid
UTF-8 (argv in the C locale, stray bytes on stdin), a pipe whose reader leaves early.

Each test runs the real entry point in a subprocess (the stream settings are the process's);
``generate`` and ``chat`` run on a fake model patched in before ``main`` (no model loads).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# ``main`` on a fake model whose replies hold non-ASCII text and show (``ascii()``) the text the
# command gave it; like the real tokenizer it refuses text with lone surrogates.
FAKE_MODEL_MAIN = r'''
import sys
from types import SimpleNamespace
from dotattn import cli, cli_chat, cli_generate

def _text(prompt):
    return prompt if isinstance(prompt, str) else " | ".join(m["content"] for m in prompt)

class Fake:
    path = "fake.gguf"
    chat_template = "{{ messages }}"
    config = SimpleNamespace(context_length=8192)
    last_stats = SimpleNamespace(prompt_tokens=3, prefill_tokens_per_s=100.0, new_tokens=2, decode_tokens_per_s=10.0)

    def chat_ids(self, prompt):
        _text(prompt).encode("utf-8")  # (the tokenizer: "TextInputSequence must be str")
        return [1] * 5

    def generate(self, prompt, **kwargs):
        text = _text(prompt)
        text.encode("utf-8")
        yield "Paris \u2014 \u5df4\u9ece \U0001f5fc caf\u00e9 "
        yield f"[{ascii(text)}]"

cli_generate.load_model = cli_chat.load_model = lambda path: Fake()
sys.exit(cli.main(sys.argv[1:]))
'''

ASCII_STDOUT = {"PYTHONIOENCODING": "ascii"}
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}  # (no coercion to C.UTF-8: LC_ALL is set)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "LANG", "LC_CTYPE")}
    return {**env, **extra}


def _run(argv, env, *, code=FAKE_MODEL_MAIN, stdin=b""):
    return subprocess.run([sys.executable, "-c", code, *argv], input=stdin, env=env, capture_output=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("env", [ASCII_STDOUT, C_LOCALE], ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])
@pytest.mark.parametrize("argv", [["info"], ["generate", "--help"]], ids=["info", "generate --help"])
def test_a_stdout_that_cannot_encode_the_text_gets_replacements(argv, env):
    """`dotattn info` printed ``—``, `--help` ``≥``: UnicodeEncodeError and exit status 1 (was)."""
    done = _run(argv, _env(**env), code="import sys; from dotattn.cli import main; sys.exit(main(sys.argv[1:]))")
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert b"?" in done.stdout and max(done.stdout) < 128


@pytest.mark.parametrize("handler", ["backslashreplace", "strict"])
def test_an_error_handler_named_in_pythonioencoding_is_kept(handler):
    """``PYTHONIOENCODING=ascii:backslashreplace`` gives ``\\u2014``, ``ascii:strict`` the error the
    user asked for — both were overridden to ``?`` until 6 Dec 2026; ``ascii`` alone still gets ``?``."""
    done = _run(["info"], _env(PYTHONIOENCODING=f"ascii:{handler}"),
                code="import sys; from dotattn.cli import main; sys.exit(main(sys.argv[1:]))")
    if handler == "strict":
        assert done.returncode != 0 and b"UnicodeEncodeError" in done.stderr
    else:
        assert done.returncode == 0, done.stderr.decode()
        assert b"\\u" in done.stdout and max(done.stdout) < 128


@pytest.mark.parametrize("env", [ASCII_STDOUT, C_LOCALE], ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])
def test_generate_on_a_non_utf8_locale(env):
    """The prompt's bytes are UTF-8 (what the terminal sent) whatever the locale says; in the C
    locale Python decodes them to lone surrogates, which the tokenizer refused with a TypeError
    traceback (was); the reply's non-ASCII text is replaced on an ASCII stdout (was UnicodeEncodeError)."""
    done = _run([b"generate", "caf\u00e9 \u5df4\u9ece?".encode()], _env(**env))
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert done.stdout == b"Paris ? ?? ? caf? ['caf\\xe9 \\u5df4\\u9ece?']\n"


@pytest.mark.parametrize("env", [ASCII_STDOUT, C_LOCALE, {}], ids=["PYTHONIOENCODING=ascii", "LC_ALL=C", "default"])
def test_chat_reads_any_bytes_on_stdin(env):
    """UTF-8 typed in an ASCII locale, and a byte that is not UTF-8 at all (a Latin-1 ``é``):
    each message reaches the model as text (was UnicodeDecodeError, or a TypeError traceback
    from the tokenizer), the undecodable byte as U+FFFD."""
    done = _run(["chat"], _env(**env), stdin="caf\u00e9\n".encode() + b"caf\xe9\n/quit\n")
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert b"['caf\\xe9']" in done.stdout
    assert b"caf\\xe9 | Paris" in done.stdout and b"| caf\\ufffd\"]" in done.stdout  # (the second turn)


def test_chat_from_a_pipe_prints_replies_without_prompts():
    """Messages piped in (a script, a file): the output is the banner and the replies, without
    the ``>>> `` prompt that a terminal shows (as Python's REPL prints none for piped input)."""
    done = _run(["chat"], _env(), stdin=b"Hi\nBye\n")
    assert done.returncode == 0, done.stderr.decode()
    assert b">>>" not in done.stdout
    assert done.stdout.count("Paris \u2014".encode()) == 2


@pytest.mark.parametrize("env", [ASCII_STDOUT, C_LOCALE], ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])
def test_chat_with_a_non_ascii_system_message(env):
    done = _run([b"chat", b"--system", "R\u00e9ponds en fran\u00e7ais.".encode()], _env(**env), stdin=b"Hi\n")
    assert done.returncode == 0, done.stderr.decode()
    assert b"['R\\xe9ponds en fran\\xe7ais. | Hi']" in done.stdout


# ``dotattn viz`` on a fake MiniLM: the sentence it would encode is shown (``ascii()``), nothing is drawn.
FAKE_VIZ_MAIN = r'''
import sys
import numpy as np
import dotattn.models
from dotattn import cli, viz

class Fake:
    def __init__(self, path):
        pass

def attention(model, sentence):
    sentence.encode("utf-8")  # (the tokenizer: "TextEncodeInput must be Union[...]")
    print(ascii(sentence))
    return ["[CLS]"], np.zeros((1, 1, 1, 1))

dotattn.models.MiniLM = Fake
viz.sentence_attention = attention
viz.plot_attention = lambda tokens, weights, path, **kwargs: path
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("env", [ASCII_STDOUT, C_LOCALE], ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])
def test_viz_on_a_non_utf8_locale(env, tmp_path):
    done = _run([b"viz", "caf\u00e9 \U0001f408".encode(), b"-o", str(tmp_path / "a.png").encode()], _env(**env),
                code=FAKE_VIZ_MAIN)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.splitlines()[0] == b"'caf\\xe9 \\U0001f408'"


def test_a_rich_table_into_a_closed_pipe_ends_quietly_with_141():
    """`dotattn bench ... | head -1` (and `dotattn demo ... | head -1`): rich's console, on a
    BrokenPipeError, points stdout at /dev/null and raises SystemExit(1) — exit status 1, as for
    a failure (was); the commands' own writes exit 141 there (tests/test_cli_flags.py)."""
    code = ("import sys; from dotattn import bench, cli; bench.run_benchmark = lambda *a, **k: []; "
            "sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "bench", "--shapes", "tiny", "--peers", "numpy-naive"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # (the reader gone before the table is printed)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()


def _bench_rows():
    from dotattn.bench import Row

    fields = Row.__dataclass_fields__
    base = {name: None for name in fields}
    ok = dict(base, case="causal-b64-h4-n11-d16-fwdbwd", peer="dotattn-numpy", status="ok", reason="",
              ms=65.312, gflops=0.125, ratio_vs_sdpa=1.25, first_s=0.09, peak_mib=1.0)
    na = dict(base, case="decode-h9kv3-q1-k128-d64", peer="numpy-naive", status="n/a", reason="forward only")
    return [Row(**{k: v for k, v in row.items() if k in fields}) for row in (ok, na)]


@pytest.mark.parametrize("columns", [80, 20])
def test_bench_table_on_a_narrow_terminal_keeps_the_numbers(columns, monkeypatch, capsys):
    """On an 80-column terminal `dotattn bench` cut its ms column to "6…" and "n…" (its columns
    were no_wrap, so rich shrank them with an ellipsis); at 20 columns every cell was empty (was).
    The table folds its cells now, and is never laid out narrower than 60 columns."""
    from dotattn import bench

    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    bench.print_table(_bench_rows())
    out = capsys.readouterr().out
    for value in ("65.3", "0.1", "1.25", "0.09", "n/a"):  # (the case and peer names may fold)
        assert value in out, out
    assert "…" not in out, out


def test_the_demos_console_is_never_narrower_than_80_columns():
    """`COLUMNS=20 dotattn demo scaling`: every cell of its table was empty (was)."""
    code = "from dotattn.demo._ui import console; print(console.width)"
    done = subprocess.run([sys.executable, "-c", code], env=_env(COLUMNS="20"), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "80"
