"""The README's and getting-started's promises: the Python code blocks of the README run as they
are (the Quickstart first), and the extras tables list what pyproject.toml defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _deps import need

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks(markdown: str) -> list[str]:
    """The fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.M | re.S)


def test_python_blocks_are_found() -> None:
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n") == ["a = 1\n"]


def test_readme_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Every Python block of the README, run in order in one namespace, as a reader would paste
    them; the Quickstart ends at packed tokens whose lengths agree with the mask."""
    need("transformers")
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks and "out.pack()" in blocks[0]
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out, tokens, cu_seqlens = namespace["out"], namespace["tokens"], namespace["cu_seqlens"]
    assert isinstance(tokens, torch.Tensor) and isinstance(cu_seqlens, torch.Tensor)
    counts = out.mask.sum(dim=(1, 2))  # type: ignore[attr-defined]
    assert cu_seqlens.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    assert tokens.shape == (int(counts.sum()), out.features.shape[-1])  # type: ignore[attr-defined]
    printed = capsys.readouterr().out.splitlines()
    comments = [
        line.split("#", 1)[1].split(":")[0].strip()
        for line in blocks[0].splitlines()
        if line.startswith("print(") and "#" in line
    ]
    assert len(printed) == len(comments)
    for shown, said in zip(printed, comments, strict=True):
        assert " ".join(shown.split()) == " ".join(said.split()), (shown, said)


def _extras_table(markdown: str) -> dict[str, set[str]]:
    """``{extra: {requirement, ...}}`` from the rows of a ``| extra | packages | for |`` table."""
    rows = re.findall(r"^\| `([a-z]+)` \| (.*?) \|", markdown, flags=re.M)
    return {extra: set(re.findall(r"`([^`]+)`", packages)) for extra, packages in rows}


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_extras_tables_agree_with_pyproject(page: str) -> None:
    tomllib = need("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    declared = {
        extra: {re.split(r"[<>=!~ ;]", r, maxsplit=1)[0] for r in requirements}
        for extra, requirements in extras.items()
    }
    assert _extras_table((ROOT / page).read_text(encoding="utf-8")) == declared


def test_readme_lists_every_docs_page() -> None:
    text = README.read_text(encoding="utf-8")
    listed = set(re.findall(r"\]\(docs/([a-z0-9-]+\.md)\)", text))
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
