"""The documentation's links: every relative link in README.md and docs/*.md points at a file
that exists and, for a Markdown target with a #fragment, at a heading that exists; every
docs/ page is reachable from the README."""
from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# [text](target "title"), ![alt](target), and reference definitions "[name]: target"
INLINE = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def doc_files() -> list[str]:
    return [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code (links are not links there)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links keep their text
    text = re.sub(r"[`*_~]|<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    out.update(re.findall(r"""<a\s+(?:name|id)\s*=\s*["']([^"']+)["']""", text))
    return out


def links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = strip_code(f.read())
    return INLINE.findall(text) + REFDEF.findall(text) + HTML.findall(text)


def broken_links(path: str) -> list[str]:
    """'file: target (why)' for every relative link of ``path`` that does not resolve."""
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http:, https:, mailto: ... are not checked (no network)
        file_part, _, fragment = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        rel = os.path.relpath(path, REPO)
        if not os.path.exists(dest):
            bad.append(f"{rel}: {target} (no such file)")
        elif fragment and dest.endswith(".md") and fragment not in anchors(dest):
            bad.append(f"{rel}: {target} (no heading with anchor #{fragment} in {os.path.relpath(dest, REPO)})")
    return bad


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_every_docs_page_is_linked_from_readme():
    readme = os.path.join(REPO, "README.md")
    linked = {os.path.normpath(os.path.join(REPO, t.partition("#")[0])) for t in links(readme)}
    pages = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    assert pages, "docs/ holds the topic pages"
    orphans = [os.path.relpath(p, REPO) for p in pages
               if p not in linked and not os.path.basename(p).startswith("_")]
    assert orphans == [], f"docs pages missing from the README's map: {orphans}"


def test_link_checker_finds_broken_links(tmp_path):
    """The checker itself: a missing file, a missing anchor and a link inside code are told apart."""
    (tmp_path / "other.md").write_text("# A page\n\n## Some `code` heading, here!\n\n## Twice\n\n## Twice\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok anchor](other.md#some-code-heading-here) [second](other.md#twice-1)\n"
        "![img](pic.png) [self](#local) [web](https://example.org/x) <img src=\"pic.png\">\n"
        "[gone](missing.md) [bad anchor](other.md#nope) <a href=\"nothere.txt\">x</a>\n"
        "`[in code](absent.md)`\n\n```\n[in fence](absent2.md)\n```\n\n## Local\n\n[ref]: also-missing.md\n")
    bad = broken_links(str(page))
    assert len(bad) == 4, bad
    assert any("missing.md (no such file)" in b for b in bad)
    assert any("other.md#nope (no heading" in b for b in bad)
    assert any("nothere.txt" in b for b in bad)
    assert any("also-missing.md" in b for b in bad)
    assert not any("absent" in b for b in bad)
