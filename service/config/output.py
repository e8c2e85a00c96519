"""The effective settings written out: TOML that ``load_config`` reads back to the same Settings, JSON, the
secrets hidden, and ``valve-inspect check-config`` (exit 0 valid, 2 invalid)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from service.config.loading import load_config
from service.config.settings import ENV_PREFIX, Settings
from service.errors import ConfigError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


#: Keys check-config never prints: (section, key).
SECRET_KEYS = (("ui", "token"),)


def redacted(settings: Settings) -> dict[str, Any]:
    """settings.model_dump() with the secrets (SECRET_KEYS) replaced by "<hidden>" when set."""
    data = settings.model_dump()
    for section, key in SECRET_KEYS:
        if data[section][key]:
            data[section][key] = "<hidden>"
    return data


def to_toml(settings: Settings, redact: bool = False) -> str:
    """The settings as a TOML document that load_config() reads back to the same Settings (with ``redact``,
    secrets read "<hidden>")."""
    lines: list[str] = []
    for section, values in (redacted(settings) if redact else settings.model_dump()).items():
        lines.append(f"[{section}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``valve-inspect check-config [FILE] [--format toml|json]``: exit 0 valid, 2 invalid."""
    parser = argparse.ArgumentParser(
        prog="valve-inspect check-config",
        description="Validate a TOML config and print the effective settings (file + VALVE_INSPECT_* "
                    "environment). Exit 0 when valid, 2 with the offending key on stderr when not.")
    parser.add_argument("file", nargs="?", help="TOML config file (omitted: the embedded demo defaults)")
    parser.add_argument("--format", choices=("toml", "json"), default="toml", help="output format (default toml)")
    args = parser.parse_args(argv)
    try:
        settings = load_config(args.file)
    except ConfigError as exc:
        print(f"valve-inspect check-config: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(redacted(settings), indent=2))
    else:
        origin = args.file or "built-in defaults"
        print(f"# effective configuration: {origin} + {ENV_PREFIX}* environment\n")
        print(to_toml(settings, redact=True), end="")
    return 0
