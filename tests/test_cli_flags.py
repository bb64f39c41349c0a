"""``dotattn generate`` and ``dotattn chat``: flags and prompts refused before the model loads,
and the model's errors as one ``dotattn: error:`` line.

No test here loads SmolLM (seconds): the loader is replaced by one that fails the test if
called, or by a fake model.  tests/models/test_smollm.py runs the commands on the real model
and checks that the API refuses what the flags' checks refuse.
"""

from __future__ import annotations

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dotattn import cli, cli_chat, cli_generate
from dotattn.errors import AttentionMemoryError, AttentionValueError


class FakeModel:
    """What the commands use of ``SmolLM``; one token per word of each message, plus 3 per message."""

    path = "/models/fake.gguf"

    def __init__(self, *, chat_template="{{ messages }}", context_length=8192, pieces=("The capital", " is Paris."), fail=None):
        self.chat_template = chat_template
        self.config = SimpleNamespace(context_length=context_length)
        self.pieces = pieces
        self.fail = fail  # (where, exception): "call" raises at generate(), "stream" after the first piece
        self.calls = []
        self.last_stats = SimpleNamespace(prompt_tokens=7, prefill_tokens_per_s=300.0, new_tokens=2, decode_tokens_per_s=20.0)

    def chat_ids(self, prompt):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return [1] * sum(3 + len(m["content"].split()) for m in messages)

    def generate(self, prompt, **kwargs):
        self.calls.append((prompt if isinstance(prompt, str) else [dict(m) for m in prompt], kwargs))
        where, exc = self.fail or (None, None)
        if where == "call":
            raise exc

        def pieces():
            for i, piece in enumerate(self.pieces):
                if where == "stream" and i == 1:
                    raise exc
                yield piece

        return pieces()


def _never_loads(path):
    raise AssertionError("the model was loaded: the command should have stopped before")


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(cli_generate, "load_model", _never_loads)
    monkeypatch.setattr(cli_chat, "load_model", _never_loads)


@pytest.fixture
def fake(monkeypatch):
    """Install a fake model: ``fake(**kwargs)`` returns it."""

    def install(**kwargs):
        model = FakeModel(**kwargs)
        monkeypatch.setattr(cli_generate, "load_model", lambda path: model)
        monkeypatch.setattr(cli_chat, "load_model", lambda path: model)
        return model

    return install


def _command(name: str) -> list[str]:
    return ["generate", "What is the capital of France?"] if name == "generate" else ["chat"]


def _usage_error(argv, capsys):
    """The output of an argparse usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured


BAD_FLAGS = [
    (["--max-new-tokens", "-3"], "--max-new-tokens must be ≥ 0, got -3"),
    (["--temperature", "-0.5"], "--temperature must be finite and ≥ 0, got -0.5"),
    (["--temperature", "nan"], "--temperature must be finite and ≥ 0, got nan"),
    (["--temperature", "inf"], "--temperature must be finite and ≥ 0, got inf"),
    (["--top-p", "0"], "--top-p must be finite and > 0 and ≤ 1, got 0.0"),
    (["--top-p", "-0.1"], "--top-p must be finite and > 0 and ≤ 1, got -0.1"),
    (["--top-p", "1.5"], "--top-p must be finite and > 0 and ≤ 1, got 1.5"),
    (["--top-p", "nan"], "--top-p must be finite and > 0 and ≤ 1, got nan"),
    (["--seed", "-1"], "--seed must be ≥ 0, got -1"),
    (["--max-new-tokens", "2.5"], "argument --max-new-tokens: invalid int value: '2.5'"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_usage_errors_before_the_model_loads(command, flags, message, no_load, capsys):
    captured = _usage_error([*_command(command), *flags], capsys)
    assert f"dotattn {command}: error: {message}\n" in captured.err
    assert captured.err.startswith(f"usage: dotattn {command}")
    assert "max_new_tokens" not in captured.err and "top_p" not in captured.err  # the flags' names, not the API's
    assert captured.out == ""


def test_the_ranges_edges_are_accepted_and_passed_on(fake, capsys):
    model = fake()
    argv = ["generate", "hi", "--max-new-tokens", "0", "--temperature", "0", "--top-p", "1", "--seed", "0"]
    assert cli.main(argv) == 0
    assert cli.main(["generate", "hi", "--temperature", "1e-9", "--top-p", "1e-9", "--seed", str(2**70)]) == 0
    assert [kwargs for _, kwargs in model.calls] == [
        dict(max_new_tokens=0, temperature=0.0, top_p=1.0, seed=0, stream=True),
        dict(max_new_tokens=128, temperature=1e-9, top_p=1e-9, seed=2**70, stream=True),
    ]
    assert capsys.readouterr().out == "The capital is Paris.\n" * 2


def test_chat_with_a_bad_flag_exits_before_the_prompt(no_load, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    captured = _usage_error(["chat", "--max-new-tokens", "-3"], capsys)
    assert "dotattn chat: error: --max-new-tokens must be ≥ 0, got -3" in captured.err
    assert "SmolLM on dotattn" not in captured.out and ">>>" not in captured.out
    assert "try /reset" not in captured.err


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_an_empty_prompt_is_a_usage_error_before_the_model_loads(prompt, no_load, capsys):
    captured = _usage_error(["generate", prompt], capsys)
    assert "dotattn generate: error: the prompt argument is empty" in captured.err
    assert captured.out == ""


def test_bad_flags_fail_fast_from_the_entry_point():
    # the real entry point (no loader patched): nothing loads, the exit status is argparse's
    code = "import sys; from dotattn.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, "generate", "hi", "--max-new-tokens", "-3"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "dotattn generate: error: --max-new-tokens must be ≥ 0, got -3"
    assert done.stdout == ""


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_file_without_chat_template_is_named_in_the_commands_words(command, fake, monkeypatch, capsys):
    model = fake(chat_template=None)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert cli.main(_command(command)) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "dotattn: error: the GGUF file '/models/fake.gguf' has no chat template (no tokenizer.chat_template), "
        f"so `dotattn {command}` cannot format a prompt for it; pass --model a chat model's GGUF file\n"
    )
    assert "generate_ids" not in captured.err
    assert captured.out == "" and model.calls == []


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_load_error_is_one_line(command, monkeypatch, capsys):
    import dotattn.models

    def refuse(path):
        raise AttentionValueError("path 'x.gguf' is not a readable GGUF file: bad magic")

    monkeypatch.setattr(dotattn.models, "SmolLM", refuse)
    assert cli.main([*_command(command), "--model", "x.gguf"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "dotattn: error: path 'x.gguf' is not a readable GGUF file: bad magic\n"
    assert captured.out == ""


@pytest.mark.parametrize("where", ["call", "stream"])
def test_a_generation_error_is_one_line_not_a_traceback(where, fake, capsys):
    fake(fail=(where, AttentionMemoryError("the KV cache of 9 GiB does not fit")))
    assert cli.main(["generate", "hi"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "dotattn: error: the KV cache of 9 GiB does not fit\n"
    assert captured.out == ("The capital\n" if where == "stream" else "")


def test_generate_checks_max_new_tokens_against_the_context(fake, capsys):
    model = fake(context_length=16)  # "What is the capital of France?": 3 + 6 = 9 tokens
    captured = _usage_error(["generate", "What is the capital of France?", "--max-new-tokens", "8"], capsys)
    assert (
        "dotattn generate: error: --max-new-tokens 8 with the prompt's 9 tokens passes the model's context "
        "of 16 tokens; give at most 7\n"
    ) in captured.err
    captured = _usage_error(["generate", " ".join(["word"] * 20), "--max-new-tokens", "0"], capsys)
    assert (
        "dotattn generate: error: the prompt takes 23 tokens with the chat template, more than the model's context of 16"
    ) in captured.err
    assert model.calls == []
    assert cli.main(["generate", "What is the capital of France?", "--max-new-tokens", "7"]) == 0


def test_chat_checks_max_new_tokens_against_the_context_before_the_prompt(fake, monkeypatch, capsys):
    fake(context_length=16)  # the shortest chat, one word: 4 tokens
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    captured = _usage_error(["chat", "--max-new-tokens", "13"], capsys)
    assert (
        "dotattn chat: error: --max-new-tokens 13 leaves no room for a message in the model's context of 16 tokens "
        "(the chat template and a one-word message take 4); give at most 12\n"
    ) in captured.err
    assert "SmolLM on dotattn" not in captured.out


def test_chat_refuses_a_message_that_would_pass_the_context_and_goes_on(fake, monkeypatch, capsys):
    model = fake(context_length=16)
    monkeypatch.setattr("sys.stdin", io.StringIO("one two three four five six\nHi\n"))
    assert cli.main(["chat", "--max-new-tokens", "8"]) == 0  # 9 + 8 > 16: refused; then 4 + 8 fits
    captured = capsys.readouterr()
    assert (
        "dotattn chat: the conversation and this message take 9 tokens; with --max-new-tokens 8 the reply would "
        "pass the model's context of 16 tokens (/reset starts over)"
    ) in captured.err
    assert [prompt for prompt, _ in model.calls] == [[{"role": "user", "content": "Hi"}]]  # the refused one dropped


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_closed_output_pipe_ends_quietly(command, fake, monkeypatch, capsys):
    """`dotattn generate "..." | head -c 20`: the reader goes, the next write raises
    BrokenPipeError — exit 141 (128 + SIGPIPE) without a traceback (was a raw traceback, exit 1)."""
    fake(fail=("stream", BrokenPipeError(32, "Broken pipe")))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert cli.main(_command(command)) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_a_closed_output_pipe_ends_quietly_from_the_entry_point():
    # a real pipe whose reader closed before the command wrote: no traceback, exit 141
    code = "import sys; from dotattn.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # (before the child has imported dotattn, let alone written)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()


@pytest.mark.parametrize("new_tokens, decode_rate, expected", [
    (0, float("nan"), "[7 prompt tokens at 300 tok/s, 0 new tokens]"),
    (1, float("nan"), "[7 prompt tokens at 300 tok/s, 1 new tokens]"),
    (5, 20.0, "[7 prompt tokens at 300 tok/s, 5 new tokens at 20.0 tok/s]"),
])
def test_the_stats_line_gives_rates_only_where_there_are_some(new_tokens, decode_rate, expected):
    stats = SimpleNamespace(prompt_tokens=7, prefill_tokens_per_s=300.0, new_tokens=new_tokens, decode_tokens_per_s=decode_rate)
    assert cli_generate.stats_line(stats) == expected


@pytest.mark.parametrize("shown", [0, 1])
def test_chat_ctrl_c_during_a_reply_keeps_what_was_shown(shown, fake, monkeypatch, capsys):
    """Ctrl-C stops a reply and the session goes on: the part shown stays in the conversation;
    stopped before any of it, the message is withdrawn (it used to stay, answered by an empty
    assistant turn that every later prompt carried)."""
    model = fake(pieces=("The capital", " is Paris."), fail=("stream", KeyboardInterrupt()))
    if shown == 0:
        model.fail = None
        model.pieces = ()

        def interrupted(prompt, **kwargs):
            model.calls.append((prompt if isinstance(prompt, str) else [dict(m) for m in prompt], kwargs))

            def pieces():
                raise KeyboardInterrupt
                yield  # (a generator)

            return pieces()

        model.generate = interrupted
    monkeypatch.setattr("sys.stdin", io.StringIO("First?\nSecond?\n"))
    assert cli.main(["chat"]) == 0
    second = model.calls[1][0]
    if shown:
        assert second[-3:] == [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "The capital"},
                               {"role": "user", "content": "Second?"}]
    else:
        assert {"role": "user", "content": "First?"} not in second
        assert second[-1] == {"role": "user", "content": "Second?"}
        assert all(m["role"] != "assistant" for m in second)
        assert "the message was not kept" in capsys.readouterr().out


def test_chat_ctrl_c_at_the_prompt_leaves_as_ctrl_d_does(fake, monkeypatch, capsys):
    """At the prompt (no reply running) Ctrl-C ends the session with status 0, as Ctrl-D and /quit do."""
    model = fake(pieces=("Paris.",))
    lines = iter(["Hi"])

    def typed(prompt=""):
        for line in lines:
            return line
        raise KeyboardInterrupt  # the second prompt: Ctrl-C

    monkeypatch.setattr("builtins.input", typed)
    assert cli.main(["chat"]) == 0
    assert len(model.calls) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "argument --seed: must be ≥ 0, got -1"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--out", "{file}"], "argument --out: '{file}' exists and is not a folder"),
])
def test_demo_flags_are_usage_errors_before_the_demo_runs(flags, message, tmp_path, capsys, monkeypatch):
    """A negative --seed reached NumPy's default_rng mid-demo and a --out naming a file failed after
    the whole demo had run, both as tracebacks (review of 7 Dec 2026)."""
    from dotattn.demo import scaling

    ran = []
    monkeypatch.setattr(scaling, "run", lambda args: ran.append(args) or 0)
    file = tmp_path / "afile"
    file.write_text("")
    flags = [f.format(file=file) for f in flags]
    captured = _usage_error(["demo", "scaling", "--quick", *flags], capsys)
    assert f"dotattn demo: error: {message.format(file=file)}\n" in captured.err
    assert ran == []
    assert cli.main(["demo", "scaling", "--quick", "--seed", "0", "--out", str(tmp_path / "new")]) == 0 and len(ran) == 1
