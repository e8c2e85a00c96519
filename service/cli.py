"""``valve-inspect``: the runtime's command line.

Each subcommand lives in its own module and owns its own argument parser; this file only
dispatches, so that e.g. ``valve-inspect check-config`` never imports ONNX Runtime.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> ("module:function", one-line help). The function takes argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("service.app:main", "run the inspection daemon (no --config: the embedded demo line)"),
    "check-config": ("service.config:main", "validate a TOML config and print the effective settings"),
    "synth": ("service.sim.synth:main", "render synthetic camera frames with ground truth"),
    "plc-sim": ("service.sim.plc_sim:main", "run the PLC simulator (a snap7 server playing the PLC side)"),
    "bench": ("service.bench:main", "benchmark the whole daemon path at increasing part rates"),
    "soak": ("service.soak:main", "one daemon at a fixed part rate for a long time: RSS, threads, fds, queues"),
}


def _usage(prog: str, commands: dict[str, tuple[str, str]]) -> str:
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    width = max(len(c) for c in commands)
    for name, (_, help_) in commands.items():
        lines.append(f"  {name.ljust(width)}  {help_}")
    lines.append("")
    lines.append(f"'{prog} <command> --help' shows a command's options.")
    return "\n".join(lines)


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, commands))
        return 0 if argv else 2
    if argv[0] == "--version":
        from service import __version__

        print(f"{prog} {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}\n\n{_usage(prog, commands)}", file=sys.stderr)
        return 2
    target, _ = commands[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch("valve-inspect", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
