"""The hand-written pages link into generated results by relative path, so a
moved or renamed result would leave a dead link nobody notices until a reader
clicks it.  These checks keep the pages and the results folder in step, and
keep docs/ itself to the hand-written pages (generated files go under
docs/results/, where the pages link to them)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

# [text](target) and ![alt](target), with an optional "title" after the target.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(page: Path) -> list[str]:
    """Relative link targets of one page, fragment dropped; fenced blocks and
    code spans are skipped (they show commands, not links)."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # an URL (http:, mailto:) or an anchor in the same page
        out.append(unquote(target.split("#", 1)[0]))
    return out


def test_pages_are_found():
    assert (REPO / "README.md") in PAGES and len(PAGES) > 2
    assert any(relative_links(p) for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    dead = [t for t in relative_links(page) if not (page.parent / t).is_file()]
    assert not dead, f"{page.relative_to(REPO)} links to missing files: {dead}"


def test_docs_top_level_is_pages_and_results():
    stray = sorted(p.name for p in DOCS.iterdir()
                   if not (p.is_file() and p.suffix == ".md")
                   and not (p.is_dir() and p.name == "results"))
    assert not stray, f"generated files belong under docs/results/: {stray}"
    assert (DOCS / "results").is_dir()


def test_link_parser(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("![plot](results/a.png) [log](results/a.log#L3) [x](https://e.org)\n"
                    "[top](#top) `[not](a link)`\n```\n[nor](this)\n```\n"
                    "[t](b%20c.md \"title\")\n")
    assert relative_links(page) == ["results/a.png", "results/a.log", "b c.md"]
