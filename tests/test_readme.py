"""The README's ```python blocks run, in order, in one namespace (as a reader would paste them)."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def test_readme_has_examples_and_both_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    assert len(BLOCKS) >= 3


def test_readme_examples_run(capsys):
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(BLOCKS, 1):
        filename = f"<README.md python block {number}>"
        # Registered so that a failure's traceback shows the block's own lines.
        linecache.cache[filename] = (len(block), None, block.splitlines(keepends=True), filename)
        exec(compile(block, filename, "exec"), namespace)
    printed = capsys.readouterr().out
    assert "(3, 5)" in printed
    assert "[[1. 0. 0.]" in printed
