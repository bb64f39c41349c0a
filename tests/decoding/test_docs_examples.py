"""docs/decoding.md's complete examples (```python blocks that start with an import) run as
written and check their own result with ``assert``; the other blocks there are signatures and
sketches with ``...``."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "decoding.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
COMPLETE = [b for b in BLOCKS if b.lstrip().startswith(("import ", "from "))]


def test_decoding_doc_complete_examples_run():
    assert COMPLETE, "docs/decoding.md has no complete example"
    for number, block in enumerate(COMPLETE, 1):
        assert "assert " in block, f"example {number} of docs/decoding.md checks nothing"
        filename = f"<docs/decoding.md complete example {number}>"
        # Registered so that a failure's traceback shows the block's own lines.
        linecache.cache[filename] = (len(block), None, block.splitlines(keepends=True), filename)
        namespace: dict = {"__name__": "docs_example"}
        exec(compile(block, filename, "exec"), namespace)
