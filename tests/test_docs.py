"""The documents link to each other instead of repeating facts: every relative link in README.md and docs/*.md
must reach an existing file and, with a ``#fragment``, a heading of it (GitHub's anchor rules)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-', and a
    '-N' suffix for the N-th repeat; headings inside code blocks do not count."""
    found, seen, in_code = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(documents) -> list[str]:
    bad = []
    for doc in documents:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file) if file else doc
            if not dest.exists():
                bad.append(f"{doc.name}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{doc.name}: {target}: no heading with that anchor")
    return bad


def test_every_relative_link_resolves():
    documents = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(documents) > 5
    assert broken_links(documents) == []


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Top: the (first) part\n## Top: the (first) part\n```\n# not a heading\n```\n")
    (tmp_path / "b.md").write_text("[ok](a.md#top-the-first-part) [ok](a.md#top-the-first-part-1) [web](https://x.y)"
                                   " [gone](c.md) [bad](a.md#not-a-heading) [self](#nothing)\n")
    assert broken_links([tmp_path / "b.md"]) == ["b.md: c.md: no such file",
                                                 "b.md: a.md#not-a-heading: no heading with that anchor",
                                                 "b.md: #nothing: no heading with that anchor"]
