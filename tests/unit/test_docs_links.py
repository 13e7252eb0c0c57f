"""Every relative link in README.md, docs/ and bench/README.md leads somewhere: the file exists,
and a ``#anchor`` names a heading of that file under GitHub's slug rules."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "bench" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, where a ``#`` starts a heading and ``[x](y)`` links."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of a Markdown file (repeats get -1, -2...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """The link targets of a file that point inside the repository (no scheme, not mail)."""
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    """What is wrong with each relative link of ``path``, one line per broken link."""
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file {destination}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{target}: no heading with anchor #{anchor} in {destination.name}")
    return problems


def test_the_documents_are_there() -> None:
    assert (ROOT / "docs").is_dir()
    assert all(path.exists() for path in DOCUMENTS)
    assert len(DOCUMENTS) > 2


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_slug_follows_githubs_rules() -> None:
    assert slug("Several processes: `--workers N`") == "several-processes---workers-n"
    assert slug("Control: timers, attributes, metadata, observability, routes") == (
        "control-timers-attributes-metadata-observability-routes"
    )
    assert slug("WSGI middleware (Flask, Django, any PEP 3333 app)") == (
        "wsgi-middleware-flask-django-any-pep-3333-app"
    )


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#a-section) [file](missing.md) [anchor](other.md#nothing)\n"
        "[here](#page) [gone](#elsewhere) [web](https://example.com/x.md)\n"
        "```\n[in code](missing-too.md)\n```\n",
        encoding="utf-8",
    )
    assert [problem.split(":")[0] for problem in broken_links(page)] == [
        "missing.md",
        "other.md#nothing",
        "#elsewhere",
    ]
