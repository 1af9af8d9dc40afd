"""Issue 7: no ``assert`` statement in library code (``python -O`` removes them).

Every check of user input must raise ``ValueError`` or ``TypeError``; an ``assert`` would vanish
under ``-O`` and let bad input through silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dynamic_s2"


def _asserts(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """``file:line`` of every ``assert`` statement in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(root)
    return [f"{rel}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Assert)]


def test_package_sources_found() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "__init__.py" in files
    assert len(files) >= 6


def test_no_assert_statements_in_library_code() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _asserts(path)]
    assert not found, "assert statements in dynamic_s2/ (raise ValueError/TypeError instead):\n" + (
        "\n".join(found)
    )


def test_detector_finds_asserts(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(x):\n    assert x > 0, 'x'\n    return x\n", encoding="utf-8")
    assert _asserts(sample, root=tmp_path) == ["sample.py:2"]
