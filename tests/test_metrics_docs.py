"""The example in docs/metrics.md runs and prints what it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def test_docs_example_runs():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})
    text = out.getvalue()
    assert "extracted prompts [True, False, False] images 1" in text
    assert "nearest of prompt 0: [5, 5, 5, 5, 5, 5, 5, 5]" in text
    assert "AUC 1.0 TPR@1%FPR 1.0" in text
