"""Real discovery: build the example and reward plugins (and a broken one) as wheels, install them into a
directory of their own, and run `sdpo envs` in a subprocess that sees them through its PYTHONPATH."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"sdpo-example": ROOT / "docs" / "plugins" / "sdpo-example", "sdpo-reward": ROOT / "plugins" / "reward"}

BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "sdpo-broken"
version = "0.0.1"

[project.entry-points.sdpo]
broken = "sdpo_broken"

[tool.setuptools]
py-modules = ["sdpo_broken"]
"""

pytestmark = pytest.mark.integration


def _offline_build() -> bool:
    """Whether this environment's setuptools can build the plugins without fetching a newer one (PEP 639)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


def _pip(*args: str, offline: bool = True) -> None:
    env = {**os.environ, "PIP_NO_INDEX": "1"} if offline else dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the three plugin distributions installed (built once per session, offline)."""
    root = tmp_path_factory.mktemp("plugin-site")
    sources = root / "src"
    for name, source in SOURCES.items():  # build from copies: setuptools writes build/ and *.egg-info in-tree
        shutil.copytree(source, sources / name,
                        ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__"))
    broken = sources / "sdpo-broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (broken / "sdpo_broken.py").write_text('raise ImportError("sdpo_broken needs a package that is not installed")\n')
    wheels, site = root / "wheels", root / "site"
    # Offline with the dev extra's setuptools; an older one (a bare venv) has pip fetch setuptools from PyPI.
    isolation = ["--no-build-isolation"] if _offline_build() else []
    _pip("wheel", "--no-deps", *isolation, "-w", str(wheels), *map(str, sorted(sources.iterdir())),
         offline=bool(isolation))
    _pip("install", "--no-deps", "--target", str(site), *map(str, sorted(wheels.glob("*.whl"))))
    return site


def sdpo(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with only `env` set among the SDPO_*_PLUGINS variables."""
    environ = {k: v for k, v in os.environ.items() if not (k.startswith("SDPO_") and k.endswith("_PLUGINS"))}
    environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return subprocess.run([sys.executable, "-m", "sdpo_core.app.cli", *args], capture_output=True, text=True,
                          env={**environ, **env}, cwd=site.parent, timeout=120)


def row(output: str, name: str) -> list[str]:
    """The cells of the table row for `name`, split on runs of 2+ spaces."""
    line = next(line for line in output.splitlines() if line.startswith(name + " "))
    return re.split(r"\s{2,}", line.strip())


def test_envs_list_discovers_installed_plugins(plugin_site):
    result = sdpo(plugin_site, "envs", "list")
    assert result.returncode == 0, result.stderr
    reverse = row(result.stdout, "reverse")
    assert reverse[0] == "reverse"
    assert reverse[1].startswith("Reverse the letters of a word")
    assert reverse[2:] == ["sdpo-example", "0.1.0"]
    reward = row(result.stdout, "reward")
    assert reward[1].startswith("Any reward callable as an environment")
    assert reward[2:] == ["sdpo-reward", "0.1.0"]
    # the broken distribution is reported, and did not stop the others
    assert ("broken (sdpo-broken 0.0.1): import of 'sdpo_broken' failed: ImportError: sdpo_broken needs a package "
            "that is not installed") in result.stdout


def test_envs_show_documents_parameters(plugin_site):
    result = sdpo(plugin_site, "envs", "show", "reward")
    assert result.returncode == 0, result.stderr
    assert "provided by: distribution sdpo-reward 0.1.0 (plugin 'reward')" in result.stdout
    assert "  fn: Callable[..., Any] | str  (required)" in result.stdout
    assert "  success_threshold: float  (default 1.0)" in result.stdout
    assert "A plain score at or above this counts as a success." in result.stdout
    example = sdpo(plugin_site, "envs", "show", "reverse")
    assert "  case_sensitive: bool  (default False)" in example.stdout


def test_envs_plugins_reports_versions_hooks_and_errors(plugin_site):
    result = sdpo(plugin_site, "envs", "plugins")
    assert result.returncode == 0, result.stderr
    assert row(result.stdout, "example")[:4] == ["example", "sdpo-example", "0.1.0", "register_environments"]
    assert row(result.stdout, "broken")[:3] == ["broken", "sdpo-broken", "0.0.1"]
    assert "error: import of 'sdpo_broken' failed" in row(result.stdout, "broken")[-1]


def test_allowlist(plugin_site):
    result = sdpo(plugin_site, "envs", "list", SDPO_LOAD_PLUGINS="sdpo-example")
    assert "reverse" in result.stdout
    assert not any(line.startswith("reward ") for line in result.stdout.splitlines())
    assert "reward (sdpo-reward 0.1.0): excluded by SDPO_LOAD_PLUGINS" in result.stdout
    assert "broken (sdpo-broken" in result.stdout  # listed as skipped, never imported
    assert "ImportError" not in result.stdout + result.stderr
    hidden = sdpo(plugin_site, "envs", "show", "reward", SDPO_LOAD_PLUGINS="sdpo-example")
    assert hidden.returncode == 1
    assert ("environment 'reward' is provided by distribution sdpo-reward 0.1.0 (plugin 'reward'), which is not "
            "loaded: SDPO_LOAD_PLUGINS='sdpo-example' does not include it") in hidden.stderr


@pytest.mark.parametrize("variable", ["SDPO_BLOCK_PLUGINS", "SDPO_DISABLE_PLUGINS"])
def test_blocklist(plugin_site, variable):
    result = sdpo(plugin_site, "envs", "list", **{variable: "sdpo-broken,sdpo-reward"})
    assert "reverse" in result.stdout
    assert "ImportError" not in result.stdout + result.stderr
    hidden = sdpo(plugin_site, "envs", "show", "reward", **{variable: "sdpo-reward"})
    assert f"{variable} blocks it; remove sdpo-reward from {variable}" in hidden.stderr


def test_installed_reward_plugin_works_from_a_spec(plugin_site):
    code = (
        "from sdpo_envs import resolve_environment\n"
        "env = resolve_environment('reward:{\"fn\": \"sdpo_example:ReverseEnvironment\"}')\n"
        "print(type(env).__module__, env.fn.__name__)\n"
    )
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(ROOT)])}
    environ.pop("SDPO_LOAD_PLUGINS", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sdpo_reward", "ReverseEnvironment"]
