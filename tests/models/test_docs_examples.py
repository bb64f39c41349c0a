"""docs/models.md's ```python blocks run as written, and what their comments promise holds.

The page's example has no ``assert`` of its own (it is what a reader types): each top-level
expression's value is kept, and the claims its comment makes — the reply, "exactly 16 new ids",
the logits' shape and dtype — are checked here against those values.
"""

from __future__ import annotations

import ast
import linecache
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the 'models' extra is not installed")
pytest.importorskip("jinja2", reason="the 'models' extra is not installed")
pytest.importorskip("tokenizers", reason="the 'models' extra is not installed")

from dotattn.models import default_model_path  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def _run_keeping_values(block: str, filename: str) -> tuple[dict, dict[str, object]]:
    """Run ``block``; return its namespace and each top-level expression's value, keyed by the
    expression's first source line (stripped of its comment)."""
    tree = ast.parse(block, filename)
    lines = block.splitlines()
    keys = []
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Expr):
            keys.append(lines[node.lineno - 1].split("#")[0].strip())
            # `expr` → `_values.append(expr)`, at the same place in the source
            call = ast.Call(
                func=ast.Attribute(value=ast.Name("_values", ast.Load()), attr="append", ctx=ast.Load()),
                args=[node.value], keywords=[],
            )
            tree.body[i] = ast.copy_location(ast.Expr(call), node)
    ast.fix_missing_locations(tree)
    linecache.cache[filename] = (len(block), None, block.splitlines(keepends=True), filename)
    namespace: dict = {"__name__": "docs_example", "_values": []}
    exec(compile(tree, filename, "exec"), namespace)
    values = namespace["_values"]
    assert len(values) == len(keys)
    return namespace, dict(zip(keys, values))


def test_models_doc_has_one_smollm_example():
    assert len(BLOCKS) == 1 and "from dotattn.models import SmolLM" in BLOCKS[0]


def test_models_doc_smollm_example_runs_and_its_comments_hold(capsys):
    try:
        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    namespace, values = _run_keeping_values(BLOCKS[0], "<docs/models.md python block 1>")
    model = namespace["model"]

    assert values['model.generate("What is the capital of France?")'] == "The capital of France is Paris."
    assert capsys.readouterr().out.strip(), "the streamed haiku printed nothing"
    french = values['model.generate([{"role": "system", "content": "Answer in French."},']
    assert isinstance(french, str) and french
    batch = values['model.generate(["Hi!", "Name three planets."])']
    assert isinstance(batch, list) and len(batch) == 2 and all(isinstance(r, str) and r for r in batch)

    ids = namespace["ids"]
    assert ids == model.encode("The quick brown fox") and len(ids) == 4  # no BOS, no template
    new = values["model.generate_ids(ids, max_new_tokens=16, stop_at_eos=False)"]
    assert len(new) == 16 and all(isinstance(t, int) for t in new)  # "exactly 16 new ids"
    logits = values["model.logits(ids)"]
    assert logits.shape == (4, 49152) and logits.dtype == np.float32  # "(4, 49152) float32"
    stats = values["model.last_stats"]
    assert stats.prompt_tokens == 4 and stats.new_tokens == 16  # the last generation: generate_ids'
