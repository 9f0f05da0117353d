"""The README stays a five-minute read whose set-up commands CI runs, and the docs hold together.

README.md is at most 12 KB and opens with the two commands ``.ci/run`` runs verbatim; every relative link in
README.md, docs/*.md and examples/README.md reaches an existing file and, where it names a ``#anchor``, a
heading of that file (GitHub's slugs); every page of docs/ can be reached from the README; LICENSE,
CITATION.cff and pyproject.toml agree on Apache-2.0.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_BYTES = 12_000  # "12 KB" in the stricter, decimal reading
LINKED_PAGES = [README, *sorted(DOCS.glob("*.md")), REPO / "examples" / "README.md"]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or [text](target "title"); images too.  Nested brackets in the text are not used here.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``#`` comment in a code block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _fenced_blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if _FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's ``-1``, ``-2`` suffixes for repeated headings."""
    seen: Counter[str] = Counter()
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        out.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def relative_links(path: Path) -> list[str]:
    prose = "\n".join(_prose_lines(path.read_text(encoding="utf-8")))  # a link's text may wrap onto a new line
    return [t for t in _LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # not http: etc.


def _resolve(page: Path, target: str) -> tuple[Path, str]:
    file_part, _, anchor = target.partition("#")
    return ((page.parent / file_part).resolve() if file_part else page), anchor


def test_slugs_follow_github():
    assert github_slug("Online blocks (`dyrep_block: online`)") == "online-blocks-dyrep_block-online"
    assert github_slug("11. Spot nodes, node loss, elastic runs and preemption") == \
        "11-spot-nodes-node-loss-elastic-runs-and-preemption"
    assert github_slug("`storage_path`: the run directory URI") == "storage_path-the-run-directory-uri"


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move the detail into docs/ and link it")


def test_readme_opens_with_the_two_setup_commands_ci_runs():
    """The first fenced block is the two commands, in order; .ci/run runs each of their steps verbatim."""
    blocks = _fenced_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no fenced code block"
    commands = [line.split("#", 1)[0].strip() for line in blocks[0] if line.strip()]
    assert len(commands) >= 2, f"the first code block of README.md holds {commands!r}, not the two set-up commands"
    first, second = commands[:2]
    assert "pip install -e ." in first and "dyrep-ray train" in first, first
    assert 'pip install -e ".[test]"' in second and "python -m pytest -q" in second, second
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for command in (first, second):
        for step in (part.strip() for part in command.split("&&")):
            assert step in ci, f".ci/run does not run the README's step {step!r}"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        path, anchor = _resolve(page, target)
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = {README.resolve()}, [README.resolve()]
    while todo:
        page = todo.pop()
        for target in relative_links(page):
            path, _ = _resolve(page, target)
            if path.suffix == ".md" and path.exists() and path not in reached:
                reached.add(path)
                todo.append(path)
    index = (DOCS / "README.md").resolve()
    assert index in reached, "README.md does not link the docs index docs/README.md"
    index_links = {_resolve(index, t)[0] for t in relative_links(index)}
    unlinked = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() != index and p.resolve() not in index_links)
    assert not unlinked, f"docs/README.md (the index) does not list: {unlinked}"
    unreached = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in reached)
    assert not unreached, f"docs pages no link from README.md leads to: {unreached}"


def test_license_is_apache_2_everywhere():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 the dyrep-ray authors" in text
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.M), "pyproject.toml: license is not Apache-2.0"


def test_citation_cff_is_valid_and_cites_the_papers():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):  # required by CFF 1.2.0
        assert cff.get(key), f"CITATION.cff lacks {key}"
    assert cff["type"] == "software" and cff["license"] == "Apache-2.0"
    refs = {ref["title"]: ref for ref in cff["references"]}
    expected = {
        "DyRep: Bootstrapping Training with Dynamic Re-parameterization": ("Huang", 2022),
        "Diverse Branch Block: Building a Convolution as an Inception-like Unit": ("Ding", 2021),
        "Online Convolutional Re-parameterization": ("Hu", 2022),
    }
    assert set(expected) <= set(refs), f"CITATION.cff references: {sorted(refs)}"
    for title, (first_author, year) in expected.items():
        ref = refs[title]
        assert ref["type"] == "conference-paper" and ref["year"] == year, title
        assert ref["authors"][0]["family-names"] == first_author, title
        assert "CVPR" in ref["conference"]["name"], title
        for author in ref["authors"]:  # a person needs family-names, an entity a name
            assert author.get("family-names") or author.get("name"), (title, author)
