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


def command_defaults(path, command: str, known: set[str]) -> dict:
    """The options of ``command``'s table (dashes or underscores), checked against ``known``
    parameter names: an unknown option is an error, not silently ignored."""
    table = read_config(path).get(command, {})
    options = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PipeError(f"config {path}: [{command}] has unknown option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}")
    return options
