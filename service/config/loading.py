"""``load_config``: read the TOML file, resolve its relative paths, check the environment's sections, validate,
and turn pydantic's errors into one ConfigError naming each key path (with "did you mean" and where an
environment variable set it); ``state_dir`` for the paths left empty."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings.exceptions import SettingsError

from service.config.sections import _LINE_FILE
from service.config.settings import _ENV, ENV_DELIMITER, ENV_PREFIX, Settings
from service.errors import ConfigError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the daemon keeps its archive and generated demo frames.

    ``$STATE_DIRECTORY`` (systemd ``StateDirectory=valve-inspect`` -> /var/lib/valve-inspect) when run as
    the service, else ``$XDG_CACHE_HOME/valve-inspect``, else ``~/.cache/valve-inspect``.
    """
    env = os.environ if env is None else env
    state = env.get("STATE_DIRECTORY", "")
    if state:
        return Path(state.split(":")[0])
    cache = env.get("XDG_CACHE_HOME", "") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "valve-inspect"


_PATH_KEYS = (("camera", "images"), ("camera", "pfs_file"), ("model", "path"), ("archive", "dir"))


def _resolve_file_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file's folder."""
    for section, key in _PATH_KEYS:
        sect = data.get(section)
        if isinstance(sect, dict) and isinstance(sect.get(key), str) and sect[key].strip():
            p = Path(os.path.expanduser(sect[key].strip()))
            if not p.is_absolute():
                sect[key] = str(base / p)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (pass an existing TOML file; see "
                          "deploy/config.example.toml)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"line (\d+)", msg)
        where = ""
        if m:
            lineno = int(m.group(1))
            lines = text.splitlines()
            if 1 <= lineno <= len(lines):
                where = f"\n  line {lineno}: {lines[lineno - 1].strip()}"
        raise ConfigError(f"{path}: TOML syntax error: {msg}{where}") from None


def _env_name(loc: tuple) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _fields_at(loc: tuple) -> list[str]:
    """The valid key names of the model at ``loc`` (for 'did you mean')."""
    model: Any = Settings
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(err: dict[str, Any], env_upper: set[str]) -> tuple[str, str]:
    loc = tuple(err.get("loc", ()))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        parent, name = loc[:-1], str(loc[-1])
        valid = _fields_at(parent)
        if parent == ("camera", "features"):
            valid = []
        hint = difflib.get_close_matches(name, valid, n=1)
        msg = "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else "")
        if valid:
            msg += f" (valid keys: {', '.join(valid)})"
    else:
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # Validators name the key first ("reconnect_min_s: must be ..."): fold it into the path.
        m = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg, re.S)
        if m:
            sub, msg = m.group(1), m.group(2)
            last = str(loc[-1]) if loc else ""
            if last and (sub == last or sub.startswith((last + ".", last + "["))):
                sub = sub[len(last):]  # a field validator names its own field: don't repeat it
            sub = sub.lstrip(".")
            if sub:
                key = _key_path(loc) + (sub if sub.startswith("[") else ("." if loc else "") + sub)
                return key, msg + _env_note(loc + tuple(x for x in re.split(r"[.\[]", sub) if x and not x.endswith("]")),
                                          env_upper)
        elif "input" in err and isinstance(err["input"], (bool, int, float, str)) and len(repr(err["input"])) < 80:
            msg += f" (got {err['input']!r})"
    return _key_path(loc) or "(top level)", msg + _env_note(loc, env_upper)


def _env_note(loc: tuple, env_upper: set[str]) -> str:
    """' [from environment VALVE_INSPECT_...]' when the environment set this key (or its section)."""
    for n in range(len(loc), 0, -1):
        if _env_name(loc[:n]) in env_upper:
            return f" [from environment {_env_name(loc[:n])}]"
    return ""


def _check_env_sections(env: Mapping[str, str]) -> None:
    sections = list(Settings.model_fields)
    for name in env:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or ENV_DELIMITER not in upper[len(ENV_PREFIX):]:
            continue
        section = upper[len(ENV_PREFIX):].split(ENV_DELIMITER, 1)[0].lower()
        if section not in sections:
            hint = difflib.get_close_matches(section, sections, n=1)
            raise ConfigError(f"environment {name}: unknown section {section!r}"
                              + (f"; did you mean {ENV_PREFIX}{hint[0].upper()}{ENV_DELIMITER}...?" if hint else "")
                              + f" (sections: {', '.join(sections)})")


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read, validate and merge the configuration.

    Args:
        path: a TOML file, or None for the embedded demo defaults.
        env: the environment to take ``VALVE_INSPECT_*`` overrides (and $STATE_DIRECTORY,
            $XDG_CACHE_HOME) from; None = os.environ.
    Raises:
        ConfigError: naming the file, the offending key path and the reason. ``.problems`` holds
            the (key, reason) pairs.
    """
    env = dict(os.environ if env is None else env)
    source = "built-in defaults" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        data = _read_toml(p)
        _resolve_file_paths(data, p.resolve().parent)
        for name in Settings.model_fields:  # a missing section is validated as {} (errors then name it)
            if isinstance(data, dict) and name not in data:
                data[name] = {}
    _check_env_sections(env)
    token = _ENV.set(env)
    line_token = _LINE_FILE.set(path is not None)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        env_upper = {k.upper() for k in env}
        problems = [_describe(e, env_upper) for e in exc.errors(include_url=False)]
        lines = "\n".join(f"  {k}: {m}" for k, m in problems)
        err = ConfigError(f"invalid configuration in {source}:\n{lines}")
        err.problems = problems  # type: ignore[attr-defined]
        err.path = source  # type: ignore[attr-defined]
        raise err from None
    except SettingsError as exc:
        m = re.search(r'field "(\w+)"', str(exc))
        section = m.group(1) if m else ""
        names = sorted(k for k in env if section and k.upper().startswith(_env_name((section,))))
        raise ConfigError(f"invalid configuration in {source}: {', '.join(names) or 'environment'}: not valid "
                          f"JSON ({exc}); lists and tables in {ENV_PREFIX}* variables take JSON, e.g. "
                          f"{ENV_PREFIX}MODEL{ENV_DELIMITER}PROVIDERS='[\"CPUExecutionProvider\"]'") from None
    finally:
        _ENV.reset(token)
        _LINE_FILE.reset(line_token)
    if not settings.archive.dir:
        archive = settings.archive.model_copy(update={"dir": str(state_dir(env) / "archive")})
        settings = settings.model_copy(update={"archive": archive})
    return settings
