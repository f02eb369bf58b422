"""The documentation holds together: README is a front page, and every relative link in it, in docs/ and in the
other Markdown guides points at a file that exists (and, for a ``#anchor`` into Markdown, at one of its headings)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
GUIDES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
          "bench/README.md", "bench/results/study/README.md", "refimpl/INTERPRETATIONS.md"]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text):
    """``text`` without fenced code blocks and code spans (a link inside code is not a link)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text):
    """The targets of every Markdown link and image in ``text``, in order."""
    return [m.group(1) for m in _LINK.finditer(_prose(text))]


def anchors(text):
    """GitHub's anchors of ``text``'s headings: lower case, punctuation dropped, spaces as dashes, repeats -1, -2."""
    seen, out = {}, set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(path, root=ROOT):
    """``path``'s relative links whose file does not exist, or whose ``#anchor`` is no heading of the target
    (each as the link and why, paths relative to ``root``)."""
    text = path.read_text()
    broken = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(root)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(root)})")
    return broken


@pytest.mark.parametrize("guide", GUIDES)
def test_every_relative_link_points_at_a_file_that_exists(guide):
    broken = broken_links(ROOT / guide)
    assert not broken, f"{guide}: broken links:\n  " + "\n  ".join(broken)


def test_the_link_checker_sees_files_anchors_and_skips_code(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## The `x` option (y)\n\n## Top\n")
    (tmp_path / "b.md").write_text(
        "[ok](a.md) [ok](a.md#the-x-option-y) [ok](a.md#top-1) ![ok](a.md) [ok](#b) [ok](https://x.org/none)\n"
        "[bad](nope.md) [`bad`](a.md#nope) [bad](#nope)\n`[not a link](nope.md)`\n```\n[not a link](nope.md)\n```\n"
        "# B\n")
    assert broken_links(tmp_path / "b.md", root=tmp_path) == [
        "nope.md (no file nope.md)", "a.md#nope (no heading #nope in a.md)", "#nope (no heading #nope in b.md)"]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, more than {README_MAX_LINES}: it is the front page (what this is, the two "
        "commands, what you see, where things are, links); move reference text to a file in docs/ and link it")


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_each_doc_says_what_it_is_for_at_the_top(doc):
    """A title, then what the file is for in prose, so a reader knows from the top whether it is the one they want."""
    title, blank, *rest = (ROOT / "docs" / doc).read_text().splitlines()
    purpose = rest[:rest.index("")] if "" in rest else rest
    assert title.startswith("# ") and not blank, f"docs/{doc}: starts '# Title' and a blank line"
    assert purpose and not re.match(r"[#|`!<>*-]", purpose[0]) and purpose[-1].endswith("."), (
        f"docs/{doc}: after the title, a paragraph of prose saying what the file is for, not {purpose[:1]}")
