"""The building blocks the ``pipe`` commands share: parameter types that check ranges at the
boundary, the group that turns any input error into one line and exit status 2, the flags
accepted before or after a command, presets, and options declared once for several commands."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import click

from . import defaults
from .config import command_defaults
from .errors import PipeError
from .forward import PRECISIONS

POSITIVE = click.IntRange(min=1)
SEED = click.IntRange(0, 2**32 - 1)  # what numpy, torch and scikit-learn all accept
MAX_WORKERS = 128  # DataLoader processes; more would only exhaust the machine
MAX_IMAGE_SIZE = 4096
MAX_LR = 10.0
MAX_TRIALS = 1000  # seeded draws per shot count of pipe fewshot

# The page that explains each command, named once: each command's --help ends with it, and
# tests/test_docs.py checks that every command has one and that it exists (anchor included).
DOCS_INDEX = "README.md#documentation"
DOCS_PAGES = {
    "extract": "docs/data.md",
    "merge": "docs/scaling.md",
    "train-head": "docs/heads.md",
    "evaluate": "docs/heads.md#evaluating",
    "report": "docs/report.md",
    "predict": "docs/deployment.md#predict",
    "export": "docs/deployment.md#export",
    "serve": "docs/deployment.md#serve",
    "fewshot": "docs/heads.md#few-shot-curves",
    "compare": "docs/heads.md#comparing-backbones",
    "info": "docs/formats.md",
    "models": "docs/backbones.md",
    "bench": "docs/performance-heads.md#why-cache-fine-tuning-vs-frozen-vs-cached-on-your-own-data",
    "make-dataset": "README.md#a-one-minute-tour",
}


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: ``nan`` and ``inf`` are usage errors."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class FloatList(click.ParamType):
    """Comma-separated finite numbers on the command line, or a list in a TOML preset.

    ``minimum`` (exclusive when ``positive``) and ``maximum`` bound every number; ``count``
    fixes how many there must be."""

    name = "floats"

    def __init__(self, minimum=None, maximum=None, positive=False, count=None):
        self.minimum, self.maximum, self.positive, self.count = minimum, maximum, positive, count

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [v for v in str(value).split(",") if v.strip()]
        try:
            numbers = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            self.fail(f"expected comma-separated numbers, got {value!r}", param, ctx)
        if not numbers or (self.count is not None and len(numbers) != self.count):
            self.fail(f"expected {self.count or 'at least one'} comma-separated number(s), got {value!r}", param, ctx)
        for number in numbers:
            low = self.minimum is not None and (number <= self.minimum if self.positive else number < self.minimum)
            if not math.isfinite(number) or low or (self.maximum is not None and number > self.maximum):
                self.fail(f"expected {self._wanted()}, got {value!r}", param, ctx)
        return numbers

    def _wanted(self) -> str:
        if self.positive and self.minimum == 0 and self.maximum is None:
            return "positive finite numbers"
        if self.minimum is not None and self.maximum is not None and not self.positive:
            return f"finite numbers from {self.minimum:g} to {self.maximum:g}"
        bounds = ([f"{'above' if self.positive else 'at least'} {self.minimum:g}"] if self.minimum is not None else []) \
            + ([f"at most {self.maximum:g}"] if self.maximum is not None else [])
        return "finite numbers" + (" " + " and ".join(bounds) if bounds else "")


class IntList(FloatList):
    """Comma-separated whole numbers of at least ``minimum`` (a :class:`FloatList` of integers)."""

    name = "integers"

    def __init__(self, minimum=1):
        super().__init__(minimum=minimum)

    def convert(self, value, param, ctx):
        numbers = super().convert(value, param, ctx)
        if not all(number.is_integer() for number in numbers):
            self.fail(f"expected whole numbers, got {value!r}", param, ctx)
        return tuple(int(number) for number in numbers)

    def _wanted(self) -> str:
        return f"whole numbers of at least {self.minimum}"


class NameList(click.ParamType):
    """Comma-separated names, each one of ``choices``, without repeats."""

    name = "names"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        names = list(value) if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        unknown = [name for name in names if name not in self.choices]
        if not names or unknown or len(set(names)) < len(names):
            self.fail(f"expected comma-separated names from {', '.join(self.choices)} without repeats, "
                      f"got {value!r}", param, ctx)
        return tuple(names)


class Shard(click.ParamType):
    """``I/N``: the I-th (0-based) of N shards."""

    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            index, count = (int(v) for v in str(value).split("/"))
        except ValueError:
            self.fail(f"expected I/N such as 0/4, got {value!r}", param, ctx)
        if not 0 <= index < count:
            self.fail(f"expected 0 <= I < N, got {value}", param, ctx)
        return index, count


class ByteSize(click.ParamType):
    """A size in bytes written as 512M, 4G, 1.5G (powers of 1024) or a plain number of bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from .memory import parse_size

        try:
            return parse_size(value)
        except PipeError as exc:
            self.fail(str(exc), param, ctx)


class PipeGroup(click.Group):
    """Turns a :class:`PipeError` or a usage error in a command into one line on stderr and
    exit status 2; ``pipe --debug`` shows the traceback instead. Each command's help ends with
    its page of the docs (:data:`DOCS_PAGES`)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(cmd, name)
        page = DOCS_PAGES.get(name or cmd.name)
        if page:
            cmd.epilog = f"\b\nDocs: {page}"  # \b: click leaves the line unwrapped

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipeError as exc:
            if ctx.params.get("debug"):
                raise
            message = str(exc)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            message = exc.format_message() + where
        click.echo(f"error: {message}", err=True)
        ctx.exit(2)


def show_debug_log() -> None:
    """``--debug``: pipe's own debug messages (e.g. why BatchNorm folding was skipped) on stderr."""
    logging.basicConfig(format="debug: %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.DEBUG)


def _set_global_flag(ctx: click.Context, param, value):
    """``-q``/``--debug`` given after the command: the same as before it."""
    if value:
        if param.name == "debug":
            show_debug_log()
        root = ctx.find_root()
        root.params[param.name] = True
        if root.obj is None:
            root.obj = {}
        root.obj[param.name] = True  # in place: the command's context already holds this dict
    return value


def global_flags(command):
    """``-q``/``--quiet`` and ``--debug`` accepted after the command too (people type them at the end)."""
    command = click.option("--debug", is_flag=True, expose_value=False, callback=_set_global_flag,
                           help="Show tracebacks for errors (same as `pipe --debug`).")(command)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_global_flag,
                        help="No progress bars (same as `pipe -q`).")(command)


def ensure_parent(path) -> str:
    """Create the folder an output file goes to; one clear error when that is impossible."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipeError(f"cannot create the folder {folder} for {path}: {exc.strerror}") from None
    return path


def _load_config(ctx: click.Context, param, value):
    """Eager ``--config``: its table becomes the command's defaults (options still win)."""
    if value:
        options = {}  # preset key (long option without dashes, or argument name) -> parameter name
        for p in ctx.command.params:
            flags = [flag[2:] for flag in p.opts if flag.startswith("--")]
            options.update({key: p.name for key in flags or [p.name] if key not in ("config", "quiet", "debug")})
        ctx.default_map = {**(ctx.default_map or {}), **command_defaults(value, ctx.command.name, options)}
    return value


def backbone_options(command):
    """``--model``, ``--weights`` and ``--image-size``: declared once for every command that builds a backbone."""
    options = [
        click.option("--model", default=defaults.MODEL, show_default=True, help="Backbone name (see `pipe models`)."),
        click.option("--weights", default=defaults.WEIGHTS, show_default=True,
                     help="DEFAULT, a weights enum name (IMAGENET1K_V2), a state_dict file, or none."),
        click.option("--image-size", default=None, type=click.IntRange(1, MAX_IMAGE_SIZE), help="Crop size, overriding the weights' transform."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


device_option = click.option("--device", default=defaults.DEVICE, show_default=True,
                             help="auto (CUDA when present), cpu or cuda.")
precision_option = click.option(
    "--precision", default=defaults.PRECISION, show_default=True, type=click.Choice(PRECISIONS),
    help="The model's arithmetic: auto is bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), "
         "float32 elsewhere; extract keeps an existing file's precision, predict the head's.")
config_option = click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                             callback=_load_config, help="TOML preset; its [command] table sets defaults.")
