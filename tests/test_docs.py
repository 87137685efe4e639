"""The documentation's links resolve, and README.md stays a front page that leads to every docs page.

Every Markdown link ``[text](target)`` in README.md, docs/*.md and the READMEs of ds_configs/ and
hostfiles/ whose target is a local path must name an existing file (relative to the page), and a
``#anchor`` must be the GitHub slug of a heading in the target page. Pure text processing: no
subprocess, no torch.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250
DOCS_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS_PAGES, ROOT / "ds_configs" / "README.md", ROOT / "hostfiles" / "README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target); the text may hold inline code or one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def local_links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on the page that is not external."""
    links = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(1)
            if target and not target.startswith(EXTERNAL):
                links.append((number, target))
    return links


def resolve(page: Path, target: str) -> tuple[Path, str]:
    """The file a link points at (the page itself for '#anchor') and its anchor ('' when none)."""
    path, _, anchor = target.partition("#")
    return (page.parent / path).resolve() if path else page.resolve(), anchor


def broken_links(page: Path) -> list[str]:
    """One message per link on the page whose file is missing or whose anchor is no heading there."""
    problems = []
    for number, target in local_links(page):
        path, anchor = resolve(page, target)
        where = f"{page.name}:{number}: ({target})"
        if not path.exists():
            problems.append(f"{where}: no file {path}")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            problems.append(f"{where}: no heading with anchor #{anchor} in {path.name}")
    return problems


def first_code_block(text: str) -> str:
    match = re.search(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "README.md has no fenced code block"
    return match.group(1)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_resolves(page):
    assert page.exists(), page
    assert broken_links(page) == []


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_starts_with_the_two_commands():
    block = first_code_block(README.read_text(encoding="utf-8"))
    assert "./scripts/demo.sh" in block and "./scripts/test.sh" in block


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS_PAGES, "docs/ has no pages"
    linked = {resolve(README, target)[0] for _, target in local_links(README)}
    assert [p.name for p in DOCS_PAGES if p.resolve() not in linked] == []


def test_github_slug():
    assert github_slug("Vector-quantised dVAE (`quantizer: vq`)") == "vector-quantised-dvae-quantizer-vq"
    assert github_slug("accelerate (1.15) big-model loading") == "accelerate-115-big-model-loading"
    assert github_slug("Bench: one `dalle-12b` res block") == "bench-one-dalle-12b-res-block"
    assert github_slug("scripts/launch.sh") == "scriptslaunchsh"
    assert github_slug("per_resblock_grad_scaling") == "per_resblock_grad_scaling"


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n\n## A section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "[fine](other.md) [fine anchor](other.md#a-section) [repeated](other.md#a-section-1) "
        "[here](#title) [web](https://example.com/x.md) [mail](mailto:a@b.c)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-section) [bad local](#nowhere)\n"
        "`[in code](missing-in-code.md)`\n\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "no file" in problems[0] and "missing.md" in problems[0]
    assert "#no-such-section" in problems[1]
    assert "#nowhere" in problems[2]
