"""The documentation builds without broken links, and its reference tables match the code."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_core.app.runs import DEFAULTS, TrainArguments
from sdpo_core.config import SDPOConfig

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ROW = re.compile(r"^\| `(\w+)` \| `(.*?)` \|", re.MULTILINE)


def section(page: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    text = (DOCS / page).read_text()
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    following = re.compile(rf"^#{{1,{len(level)}}} ", re.MULTILINE).search(text, start + len(heading) + 1)
    return text[start:following.start() if following else len(text)]


def documented(text: str) -> dict[str, str]:
    return dict(ROW.findall(text))


def defaults_of(cls: type) -> dict[str, str]:
    values = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        values[f.name] = repr(value)
    return values


def test_sdpo_config_reference_lists_every_field_with_its_default():
    assert documented(section("config.md", "## Fields")) == defaults_of(SDPOConfig)


def test_train_arguments_reference_lists_every_field_with_its_default():
    assert documented(section("training.md", "### TrainArguments")) == defaults_of(TrainArguments)


def test_embedded_default_table_matches_the_code():
    assert documented(section("training.md", "### The embedded default")) == {k: repr(v) for k, v in DEFAULTS.items()}


def test_plugin_pages_are_in_the_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    for page in ("plugins/tutorial.md", "plugins/hooks.md"):
        assert page in nav
        assert (DOCS / page).is_file(), f"docs/{page} is in the navigation but missing"


@pytest.mark.integration
def test_mkdocs_builds_strictly(tmp_path):
    """`--strict` turns every warning into an error: broken links, missing anchors, nav entries without a page."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "config" / "index.html").is_file()
