"""The ``sdpo`` command line.

Each subcommand group is added by a small ``_add_<name>_parser(subparsers)`` function that sets
``func`` on its leaf parsers; `main` only dispatches. No training logic lives here: commands resolve
names into plain objects (environments, configs) and hand them to the library.

    sdpo envs list             environments with description, distribution and version
    sdpo envs show NAME        an environment's parameters (from its factory's signature and docstring)
    sdpo envs plugins          installed plugins, their hooks and load errors
    sdpo sandbox doctor        each registered sandbox backend: does it work here, what it isolates
    sdpo sandbox build-image   build a backend's image (docker: from this machine's Python, no registry)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from sdpo_core.app.discover_cli import add_discover_parser
from sdpo_core.app.runs import add_eval_parser, add_train_parser
from sdpo_envs import plugins as sdpo_plugins
from sdpo_envs import registry


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str], max_width: int = 60) -> str:
    """A plain-text table; cells longer than `max_width` are cut with an ellipsis."""
    cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plugin_problems() -> list[str]:
    problems = []
    for p in sdpo_plugins.get_plugins():
        if p["error"]:
            where = f"{p['dist']} {p['version']}" if p["dist"] else "registered directly"
            problems.append(f"  {p['name']} ({where}): {p['error']}")
    return problems


# ------------------------------------------------------------------------------------------ sdpo envs
def _envs_list(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():  # failures are part of the listing below
        warnings.simplefilter("ignore", sdpo_plugins.PluginLoadWarning)
        factories = registry.list_environments()
        problems = _plugin_problems()
        skipped = sdpo_plugins.skipped_plugins()
    if args.json:
        print(json.dumps({
            "environments": [{"name": f.name, "description": f.description, "plugin": f.plugin, "dist": f.dist,
                              "version": f.version} for f in factories],
            "plugins": sdpo_plugins.get_plugins(),
            "skipped": [{"name": s.name, "dist": s.dist, "version": s.version, "variable": s.variable}
                        for s in skipped],
        }, indent=2))
        return 0
    names = [f.name for f in factories]
    rows = [[f.name + (" (DUPLICATE)" if names.count(f.name) > 1 else ""), f.description,
             f.dist or f"(plugin {f.plugin})", f.version or ""] for f in factories]
    print(_table(rows, ["NAME", "DESCRIPTION", "DISTRIBUTION", "VERSION"]) if rows else "No environments registered.")
    if problems:
        print("\nPlugins with errors:")
        print("\n".join(problems))
    if skipped:
        print("\nInstalled plugins not loaded:")
        for s in skipped:
            print(f"  {s.name} ({s.dist} {s.version}): excluded by {s.variable}")
    return 0


def _envs_show(args: argparse.Namespace) -> int:
    try:
        factory = registry.get_factory(args.name)
    except LookupError as exc:
        print(f"sdpo: {exc}", file=sys.stderr)
        return 1
    params = factory.parameters()
    if args.json:
        print(json.dumps({"name": factory.name, "description": factory.description, "plugin": factory.plugin,
                          "dist": factory.dist, "version": factory.version, "factory": factory.factory_path,
                          "parameters": [vars(p) for p in params]}, indent=2))
        return 0
    print(f"{factory.name}: {factory.description or '(no description)'}")
    origin = f"{factory.source} (plugin {factory.plugin!r})" if factory.dist else f"{factory.source} (no distribution)"
    print(f"  provided by: {origin}")
    print(f"  factory:     {factory.factory_path}")
    print("\nParameters:" if params else "\nParameters: none")
    for p in params:
        default = "required" if p.required else (f"default {p.default}" if p.default is not None else "")
        head = "  " + p.name + (f": {p.annotation}" if p.annotation else "") + (f"  ({default})" if default else "")
        print(head)
        if p.help:
            print(f"      {p.help}")
    print(f'\nUse: sdpo_envs.make("{factory.name}", ...) or the spec \'{factory.name}:{{"param": value}}\'')
    return 0


def _envs_plugins(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdpo_plugins.PluginLoadWarning)
        infos = sdpo_plugins.get_plugins()
        skipped = sdpo_plugins.skipped_plugins()
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    rows = [[p["name"], p["dist"] or "(registered directly)", p["version"] or "", ", ".join(p["hooks"]),
             "error: " + p["error"] if p["error"] else "ok"] for p in infos]
    rows += [[s.name, s.dist or "", s.version or "", "", f"not loaded ({s.variable})"] for s in skipped]
    print(_table(rows, ["PLUGIN", "DISTRIBUTION", "VERSION", "HOOKS", "STATUS"], max_width=80)
          if rows else "No sdpo plugins installed.")
    return 0


def _add_envs_parser(subparsers: Any) -> None:
    envs = subparsers.add_parser("envs", help="list and inspect environments and plugins",
                                 description="Environments come from plugins (entry-point group 'sdpo').")
    commands = envs.add_subparsers(dest="envs_command", metavar="COMMAND", required=True)
    list_parser = commands.add_parser("list", help="registered environments, with distribution and version")
    list_parser.add_argument("--json", action="store_true", help="machine-readable output")
    list_parser.set_defaults(func=_envs_list)
    show = commands.add_parser("show", help="an environment's description and parameters")
    show.add_argument("name", help="the registered environment name")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_envs_show)
    plugins = commands.add_parser("plugins", help="installed plugins, their hooks and errors")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_envs_plugins)


# ------------------------------------------------------------------------------------------ sdpo sandbox
def _sandbox_doctor(args: argparse.Namespace) -> int:
    """Probe every registered backend (through its factory's optional ``describe()``); 1 if none works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sdpo_plugins.PluginLoadWarning)
        reports = [registry.describe_sandbox(f) for f in registry.list_sandboxes()]
    if args.json:
        print(json.dumps([vars(r) for r in reports], indent=2))
    elif not reports:
        print("No sandbox backends registered (install a plugin that provides one, e.g. sdpo-code).")
    for report in [] if args.json else reports:
        state = {True: "works here", False: "does NOT work here", None: "unknown (no probe)"}[report.works]
        print(f"{report.name}: {state}  ({report.source})")
        if report.description:
            print(f"  {report.description}")
        if report.detail:
            print(f"  {report.detail}")
        for title, items in (("isolates", report.isolates), ("NOT isolated", report.not_isolated)):
            if items:
                print(f"  {title}:")
                print("\n".join(f"    - {item}" for item in items))
    return 0 if any(r.works for r in reports) else 1


def _sandbox_build_image(args: argparse.Namespace) -> int:
    """Hand the arguments to the backend factory's ``build_image(argv)``, for backends that have an image."""
    build = getattr(registry.get_factory(args.backend, "sandbox").factory, "build_image", None)
    if not callable(build):
        print(f"sandbox backend {args.backend!r} has no image to build")
        return 2
    return int(build(args.options))


def _add_sandbox_parser(subparsers: Any) -> None:
    sandbox = subparsers.add_parser("sandbox", help="code-execution backends",
                                    description="Sandbox backends come from plugins (the register_sandboxes hook).")
    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND", required=True)
    doctor = commands.add_parser("doctor", help="for each backend: whether it works here, what it isolates and "
                                                "what it does not")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=_sandbox_doctor)
    image = commands.add_parser("build-image", help="build a backend's image (docker: from this machine's Python)")
    image.add_argument("backend", nargs="?", default="docker", help="the backend (default docker)")
    image.add_argument("options", nargs=argparse.REMAINDER, help="the backend's own options (e.g. --tag, --python)")
    image.set_defaults(func=_sandbox_build_image)


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The ``sdpo`` parser; each command group is added by its ``_add_*_parser`` function."""
    parser = argparse.ArgumentParser(prog="sdpo", description="SDPO on TRL with Gym-style environments.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_envs_parser(subparsers)
    _add_sandbox_parser(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_discover_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdpo`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
