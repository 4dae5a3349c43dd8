"""Every reference to the specification in code, tests and benchmarks points at something that exists.

Code cites the docs as `docs/algorithm.md §2.6` (a numbered heading), `docs/peers.md SDPO-RL-4` (a peer defect's
ID), or a bare docs path; docs/peers.md and docs/sandbox.md §8 name the tests that guard each defect, and those
tests must exist too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SOURCES = [
    *sorted(
        path
        for folder in ("sdpo_core", "sdpo_envs", "plugins", "tests", "benchmarks", "scripts")
        for path in (REPO / folder).rglob("*")
        if path.suffix in {".py", ".sh", ".toml"} and ".venv" not in path.parts and "build" not in path.parts
    ),
    REPO / "README.md",
    REPO / "pyproject.toml",
]

SECTION_REF = re.compile(r"(?:docs/)?([\w-]+\.md) §(\d+(?:\.\d+)*)")
BARE_SECTION = re.compile(r"§ ?\d")
DOCS_PATH = re.compile(r"\bdocs/[\w./-]+\.(?:md|png)\b")
PEER_ID = re.compile(r"\b(?:SDPO-RL|TRL-SDPO|REF)-\d+\b")
OLD_STYLE = re.compile(r"sdpo-rl bug|peers\.md (?:TRL|bug) ?#?\d|TRL #\d")
NUMBERED_HEADING = re.compile(r"^#+ (\d+(?:\.\d+)*)[.\s]", re.MULTILINE)
GUARD = re.compile(r"`((?:tests|plugins/[\w-]+/tests)/[\w/]+\.py|test_\w+\.py)::(\w+)`")


def numbered_sections(page: str) -> set[str]:
    return set(NUMBERED_HEADING.findall((DOCS / page).read_text()))


def this_file(path: Path) -> bool:
    return path == Path(__file__)


def test_sections_are_numbered_where_code_cites_them():
    assert {"2", "2.6", "4", "4.1", "5"} <= numbered_sections("algorithm.md")
    assert {"8", "8.2"} <= numbered_sections("sandbox.md")


@pytest.mark.parametrize("path", [p for p in SOURCES if not this_file(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_every_reference_resolves(path: Path):
    text = path.read_text(errors="replace")
    problems = []
    for page, number in SECTION_REF.findall(text):
        if not (DOCS / page).is_file():
            problems.append(f"{page} §{number}: no docs/{page}")
        elif number not in numbered_sections(page):
            problems.append(f"{page} §{number}: docs/{page} has no section {number}")
    cited = len(SECTION_REF.findall(text))
    if len(BARE_SECTION.findall(text)) > cited:
        problems.append("a § without the page it belongs to (write `docs/PAGE.md §N`)")
    for docs_path in DOCS_PATH.findall(text):
        if not (REPO / docs_path).exists():
            problems.append(f"{docs_path} does not exist")
    peers = (DOCS / "peers.md").read_text()
    for peer_id in PEER_ID.findall(text):
        if f"| {peer_id} |" not in peers:
            problems.append(f"{peer_id} is not an ID in docs/peers.md")
    problems += [f"old-style peer reference {m!r}: cite docs/peers.md ID" for m in OLD_STYLE.findall(text)]
    assert not problems, problems


def _test_file(name: str, page: Path) -> Path:
    if "/" in name:
        return REPO / name
    return REPO / "plugins/code/tests" / name  # the sandbox page names the code plugin's tests by file name


@pytest.mark.parametrize("page", ["peers.md", "sandbox.md"])
def test_every_guard_the_docs_name_is_a_test(page: str):
    guards = GUARD.findall((DOCS / page).read_text())
    assert guards, f"docs/{page} names no guarding tests"
    missing = [f"{f}::{name}" for f, name in guards
               if not re.search(rf"^\s*def {name}\(", _test_file(f, DOCS / page).read_text(), re.MULTILINE)]
    assert not missing, missing


def test_every_peer_defect_names_a_guard():
    rows = [line for line in (DOCS / "peers.md").read_text().splitlines() if PEER_ID.match(line.lstrip("| "))]
    assert rows
    assert all(GUARD.search(row) for row in rows), [row[:40] for row in rows if not GUARD.search(row)]
