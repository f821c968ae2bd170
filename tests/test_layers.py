"""Data flows one way: calibration -> pipeline -> exporters -> devices -> fair_edge (the command
line on top). A lower layer never imports a higher one (at module level or inside a function),
checked on every source file."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["calibration", "pipeline", "exporters", "devices", "fair_edge"]


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_lower_layers_never_import_higher_ones() -> None:
    offences = []
    for rank, layer in enumerate(ORDER):
        higher = set(ORDER[rank + 1 :])
        for path in sorted((ROOT / layer).rglob("*.py")):
            bad = _imported_packages(path) & higher
            if bad:
                offences.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offences, offences


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from fair_edge.cli import main\n    import exporters.surgery\n")
    assert _imported_packages(src) == {"fair_edge", "exporters"}
