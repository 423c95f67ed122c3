"""The code in docs/ runs: every ```python block of the guides is executed."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCKS = [(path.name, i, code) for path in sorted(DOCS.glob("GUIDANCE.md"))
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))]


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{n}:{i}" for n, i, _ in BLOCKS])
def test_doc_block_runs(name, index, code):
    exec(compile(code, f"{name}[{index}]", "exec"), {"__name__": "docs_example"})


def test_there_is_a_worked_example():
    assert BLOCKS, "docs/GUIDANCE.md lost its worked example"
