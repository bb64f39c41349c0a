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
