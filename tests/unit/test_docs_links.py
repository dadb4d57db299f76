"""Every relative link in README.md and docs/*.md points to a file that exists, and every anchor to a heading in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images are links too but none are used
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans (a `[x](y)` in code is not a link)."""
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens; repeats get -1, -2..."""
    seen: dict[str, int] = {}
    ids = set()
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        ids.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return ids


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8"))) if not t.startswith(EXTERNAL)]


def test_there_are_pages_and_links():
    assert len(PAGES) > 2 and sum(len(links(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme_and_the_index():
    pages = {p.name for p in PAGES if p.parent.name == "docs"}
    readme = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md") if t.startswith("docs/")}
    index = {Path(t.partition("#")[0]).name for t in links(ROOT / "docs" / "index.md")}
    assert pages - readme == set(), "README.md's table of contents misses a docs page"
    assert pages - {"index.md"} - index == set(), "docs/index.md misses a page"


def test_anchor_rule_matches_github():
    page = ROOT / "docs" / "evaluation.md"
    assert {"evaluation-lora-tune-eval", "trying-the-model-generate-and-chat"} <= anchors(page)
