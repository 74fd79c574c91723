"""TOML presets: one table per command, keys named like the command's long options."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import PipeError


def read_config(path) -> dict[str, dict]:
    """Parse a preset file; a missing file or invalid TOML is a PipeError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise PipeError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipeError(f"config {path} is not valid TOML: {exc}") from None
    if not all(isinstance(v, dict) for v in data.values()):
        raise PipeError(f"config {path}: put options in a table per command, e.g. [extract] or [train-head]")
    return data


def command_defaults(path, command: str, options: dict[str, str]) -> dict:
    """The settings of ``command``'s table, keyed by parameter name. ``options`` maps each
    accepted key (a long option name without dashes, e.g. ``batch-size``) to its parameter
    name; keys may use dashes or underscores, and an unknown key is an error, not ignored."""
    table = read_config(path).get(command, {})
    accepted = {key.replace("-", "_"): name for key, name in options.items()}
    unknown = sorted(k for k in table if k.replace("-", "_") not in accepted)
    if unknown:
        raise PipeError(f"config {path}: [{command}] has unknown option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(options))}")
    return {accepted[key.replace("-", "_")]: value for key, value in table.items()}
