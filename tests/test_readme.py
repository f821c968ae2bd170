"""The README's Python API example runs as written (in a temporary folder)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.startswith(("import", "from"))]
    assert len(lines) <= 10, f"the API example is {len(lines)} lines, the README promises ten"
    cwd, out = os.getcwd(), io.StringIO()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "pruned.onnx").is_file()
    printed = out.getvalue().splitlines()
    assert len(printed) == 2
    assert "speedup_p50" in printed[1]
