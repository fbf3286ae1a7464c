"""The documents a user reads: every relative link resolves (to a file, and to a heading where it
names one), the README stays short with its two commands near the top, BENCHMARKS.md stays a
page of current tables, and no internal issue number reaches a user-facing page."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CHANGELOG.md",
        *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path):
    return {_anchor(line.lstrip("#")) for line in path.read_text().splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert broken == []


def test_readme_is_short_with_the_commands_near_the_top():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first = "\n".join(lines[:80])
    assert "bash scripts/setup_env.sh && .venv/bin/python -m softmax_ce bench" in first
    assert "bash scripts/setup_env.sh && SOFTMAX_CE_REQUIRE_EXTENSION=1 .venv/bin/python -m pytest" \
        in first


def test_benchmarks_page_is_short_and_links_every_history_file():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) <= 400
    history = sorted((ROOT / "docs" / "bench-history").glob("*.md"))
    assert history
    for f in history:
        assert f"docs/bench-history/{f.name}" in text, f.name


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "CHANGELOG.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_issue_numbers(doc):
    assert re.findall(r"(?i)\bissue\s*#?\d+", doc.read_text()) == []
