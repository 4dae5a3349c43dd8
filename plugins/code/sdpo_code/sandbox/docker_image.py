"""Build the docker backend's image from this machine's Python, with no registry.

The image is a root file system holding one interpreter, the shared libraries it and its extension modules
load (found with ``ldd``), and its standard library without the parts a solution never needs (tests, IDLE,
Tk, the installers); nothing else: no shell, no package manager, no site-packages. It is imported into the
engine with ``docker import`` semantics (one layer), so it is small (about 40 MB) and the same bytes for the
same interpreter. ``sdpo sandbox build-image`` runs `build_image`.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_TAG = "sdpo-code-python:local"
SKIPPED_STDLIB = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                            "site-packages", "dist-packages", "config-3"})
_LDD_PATH = re.compile(r"(/\S+)")


def _interpreter_layout(python: str) -> dict[str, Any]:
    """The interpreter's real path, standard library and extension-module directories, asked of it."""
    code = ("import sys, sysconfig, json; p = sysconfig.get_paths(); print(json.dumps({'exe': sys.executable, "
            "'stdlib': p['stdlib'], 'dynload': sysconfig.get_config_var('DESTSHARED'), "
            "'version': list(sys.version_info[:2])}))")
    out = subprocess.run([python, "-I", "-S", "-c", code], check=True, capture_output=True, text=True, timeout=60)
    layout = json.loads(out.stdout)
    layout["exe"] = os.path.realpath(layout["exe"])
    return layout


def shared_libraries(binaries: list[str]) -> set[str]:
    """Every shared library `binaries` load, as ``ldd`` resolves them (the loader included)."""
    libs: set[str] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            match = _LDD_PATH.search(line.split("=>")[-1])
            if match and os.path.exists(match.group(1)):
                libs.add(match.group(1))
    return libs


def _stdlib_files(stdlib: str) -> Iterator[str]:
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if not (root == stdlib and (d in SKIPPED_STDLIB or d.startswith("config-"))))
        for name in sorted(files):
            yield os.path.join(root, name)


def root_filesystem(python: str = "/usr/bin/python3") -> bytes:
    """A tar of the image's root file system for `python` (see the module docstring)."""
    layout = _interpreter_layout(python)
    stdlib, dynload = layout["stdlib"], layout["dynload"]
    files = set(_stdlib_files(stdlib))
    if dynload and os.path.isdir(dynload):
        files |= {os.path.join(dynload, n) for n in os.listdir(dynload)}
    extensions = [f for f in files if f.endswith(".so")]
    files |= shared_libraries([layout["exe"], *extensions])
    files.add(layout["exe"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        # every directory explicitly, 0755 (an engine creates a missing parent with mode 0600, which user
        # 65534 cannot search)
        parents = {str(p) for f in files for p in Path(f.lstrip("/")).parents if str(p) != "."}
        for directory in sorted(parents | {"tmp", "proc", "dev", "etc", "usr/bin"}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        for path in sorted(files):
            tar.add(os.path.realpath(path), arcname=path.lstrip("/"), recursive=False)
        for name in ("python", "python3"):
            link = tarfile.TarInfo(f"usr/bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, layout["exe"]
            if layout["exe"] != f"/usr/bin/{name}":
                tar.addfile(link)
    return buf.getvalue()


def build_image(client: Any = None, *, tag: str = DEFAULT_TAG, python: str = "/usr/bin/python3") -> str:
    """Import the root file system of `python` into the engine as `tag`; returns the image id.

    `client` is a ``docker.DockerClient`` (default: from the environment, ``DOCKER_HOST``).
    """
    if client is None:
        import docker

        client = docker.from_env()
    data = root_filesystem(python)
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(data)
        f.flush()
        repository, _, version = tag.partition(":")
        client.api.import_image_from_file(f.name, repository=repository, tag=version or "latest")
    return str(client.images.get(tag).id)


def main(argv: list[str] | None = None) -> int:
    """``sdpo sandbox build-image [--tag T] [--python P]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="sdpo sandbox build-image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image name (default {DEFAULT_TAG})")
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter to package")
    args = parser.parse_args(argv)
    image = build_image(tag=args.tag, python=args.python)
    sys.stdout.write(f"built {args.tag} ({image}) from {Path(args.python)}\n")
    return 0
