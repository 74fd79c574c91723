"""Reading README.md and docs/*.md for tests/test_docs.py: fenced blocks and their markers, the
``pipe`` command lines and inline code spans they hold, figure annotations and links.

Markers are HTML comments (invisible on GitHub) on the line right before a fence:

* ``<!-- illustrative: REASON -->``: the block is not run (a diagram, an output, a GPU job);
  the reason is required.
* ``<!-- run as: python FILE.py ARGS -->``: a Python block saved as ``FILE.py`` and run so.

A figure annotation says where the numbers of the next table, paragraph or fenced block come
from::

    <!-- figures bench/results/extract-cpu-2core.json
    0.90 = speed/efficientnet_lite0/c/achievable
    7.3 = speed/efficientnet_lite0/decode_seconds_per_image_one_core/pil_draft (pipe) * 1000
    -->

Each entry is ``SHOWN = KEY/PATH`` with an optional ``* FACTOR``, one a line or several separated
by ``;``; keys may hold ``/`` themselves (``c/achievable``), list items are numbers. A ratio of
two values of the file is ``SHOWN = KEY/PATH over KEY/PATH``. Several
annotations may be stacked before one block.

A table of measured figures (one with a decimal number outside code spans) on
the pages that quote measurements needs, in the comments right before it, a figure annotation,
or ``<!-- illustrative: REASON -->`` (made-up numbers) or ``<!-- unchecked: REASON -->``
(measured, not yet tied to a results file), the reason required.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
COMMENT = re.compile(r"<!--(.*?)-->", re.DOTALL)
FIGURE_LINE = re.compile(r"^\s*(\S+)\s+=\s+(.+?)(?:\s+over\s+(.+?))?(?:\s+\*\s+([0-9.eE+-]+))?\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
# `pipe CMD ...` in a code span or a block line; torchrun's `-m pipeline CMD ...` too
PIPE_CALL = re.compile(r"(?:^|\$ |\s)(?:pipe|-m pipeline)((?:\s+[^\s#|;&]+)*)")


def shown_name(path: Path) -> str:
    """A file's name in messages: relative to the repository when it is in it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def doc_files() -> list[Path]:
    """README.md and every page of docs/, in a fixed order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    """One fenced block: where it is, its info string, its text and the marker before it."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None  # "illustrative" or "run as"
    marker_value: str = ""

    @property
    def where(self) -> str:
        return f"{shown_name(self.path)}:{self.line}"


def _comment_before(lines: list[str], index: int) -> str | None:
    """The HTML comment that ends on the line right before ``lines[index]``, if any."""
    if index == 0 or not lines[index - 1].rstrip().endswith("-->"):
        return None
    start = index - 1
    while start >= 0 and "<!--" not in lines[start]:
        start -= 1
    match = COMMENT.search("\n".join(lines[start:index]))
    return match.group(1).strip() if match else None


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker comment right before it."""
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening.group(1)
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        block = Block(path, i + 1, opening.group(2), "\n".join(lines[i + 1:end]) + "\n")
        comment = _comment_before(lines, i)
        for marker in ("illustrative", "run as"):
            if comment and comment.startswith(marker + ":"):
                block.marker, block.marker_value = marker, comment[len(marker) + 1:].strip()
        blocks.append(block)
        i = end + 1
    return blocks


def prose(path: Path) -> str:
    """The file with its fenced blocks blanked out (lines kept, so positions stay)."""
    lines = path.read_text().split("\n")
    inside, fence = False, ""
    for n, line in enumerate(lines):
        opening = FENCE.match(line)
        if not inside and opening:
            inside, fence = True, opening.group(1)
            lines[n] = ""
        elif inside:
            inside = not line.strip().startswith(fence)
            lines[n] = ""
    return "\n".join(lines)


def command_lines(block: Block) -> list[str] | None:
    """The commands of a shell block, one per logical line, or None when the block holds
    anything but ``pipe`` commands, ``pip install`` lines and comments (``$ `` transcripts:
    the other lines are output)."""
    logical, pending = [], ""
    for raw in block.text.split("\n"):
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical.append(pending + raw)
        pending = ""
    transcript = any(line.startswith("$ ") for line in logical)
    commands = []
    for line in logical:
        if transcript:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not re.match(r"(pipe|pip install) ", line):
            return None
        commands.append(line)
    return commands or None


def split_command(line: str) -> list[str]:
    """A command line as the shell would split it, trailing ``# comment`` dropped."""
    return shlex.split(line, comments=True)


@dataclass
class PipeCall:
    """``pipe [flags] COMMAND [args and --options]`` as written somewhere in the docs."""

    where: str
    text: str
    command: str | None = None
    options: list[str] = field(default_factory=list)
    global_options: list[str] = field(default_factory=list)


def pipe_calls_in(text: str, where: str) -> list[PipeCall]:
    """Every ``pipe ...`` call in a line or a code span, with the options it names."""
    calls = []
    for match in PIPE_CALL.finditer(text):
        call = PipeCall(where, match.group(0).strip())
        for token in match.group(1).split():
            token = token.strip("[]()")
            if call.command is None and re.fullmatch(r"[A-Z][A-Z_]*", token):
                break  # `pipe COMMAND --option`: a pattern, not a call
            if call.command is None and re.fullmatch(r"[a-z][a-z-]*", token):
                call.command = token
                continue
            for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", token):
                (call.options if call.command else call.global_options).append(option)
        else:
            calls.append(call)
    return calls


def pipe_calls(path: Path) -> list[PipeCall]:
    """The ``pipe`` calls of a file: in every fenced block line (illustrative ones too) and in
    every inline code span of the prose."""
    rel = shown_name(path)
    calls = []
    for block in fenced_blocks(path):
        for n, line in enumerate(block.text.split("\n")):
            if re.match(r"\s*(\$ )?pipe\s", line) or "-m pipeline " in line:
                calls += pipe_calls_in(line.split(" # ")[0], f"{rel}:{block.line + 1 + n}")
    text = prose(path)
    for span in re.finditer(r"`([^`]+)`", text):
        line = text.count("\n", 0, span.start()) + 1
        content = span.group(1).replace("\\|", "|").replace("\n", " ")
        if re.match(r"(\$ )?pipe(\s|$)", content) or "-m pipeline " in content:
            calls += pipe_calls_in(content.replace("|", " "), f"{rel}:{line}")
    return calls


def bare_options(path: Path) -> list[tuple[str, str]]:
    """(where, option) for every inline code span that starts with an option (`--tol 1e-5`):
    prose naming an option without its command."""
    text = prose(path)
    return [(f"{shown_name(path)}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1))
            for m in re.finditer(r"`(--[a-zA-Z][\w-]*)[^`]*`", text)]


@dataclass
class Figure:
    """One quoted figure: the text shown, the results file, the key path and a factor."""

    where: str
    shown: str
    results: str
    path: str
    factor: float
    covered: str  # the table, paragraph or block the annotation stands before
    over: str | None = None  # the key path of the divisor, for a ratio


def _covered_text(lines: list[str], start: int) -> str:
    """The block starting at ``lines[start]`` after any further comments: a fenced block
    whole, else the lines up to the next blank one."""
    i = start
    while i < len(lines):
        if not lines[i].strip():
            i += 1
        elif lines[i].lstrip().startswith("<!--"):
            while "-->" not in lines[i]:
                i += 1
            i += 1
        else:
            break
    end = i + 1
    opening = FENCE.match(lines[i]) if i < len(lines) else None
    if opening:
        while end < len(lines) and not lines[end].strip().startswith(opening.group(1)):
            end += 1
    else:
        while end < len(lines) and lines[end].strip():
            end += 1
    return "\n".join(lines[i:end])


def figures(path: Path) -> list[Figure]:
    """Every figure annotated in a Markdown file (see the module docstring)."""
    lines = path.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        head = re.match(r"\s*<!--\s*figures\s+(\S+)\s*$", lines[i])
        if not head:
            i += 1
            continue
        end = i + 1
        while "-->" not in lines[end]:
            end += 1
        covered = _covered_text(lines, end + 1)
        for n in range(i + 1, end):
            for entry in lines[n].split(";"):
                line = FIGURE_LINE.match(entry)
                if not line:
                    raise ValueError(f"{shown_name(path)}:{n + 1}: expected 'SHOWN = KEY/PATH [over KEY/PATH] [* FACTOR]'")
                found.append(Figure(f"{shown_name(path)}:{n + 1}", line.group(1), head.group(1), line.group(2),
                                    float(line.group(4) or 1), covered, line.group(3)))
        i = end + 1
    return found


def lookup(data, path: str):
    """The value at a ``/``-separated key path whose keys may contain ``/`` themselves: at each
    level the one key (or list index) that the rest of the path starts with."""
    rest = path
    while rest:
        if isinstance(data, list):
            head, _, rest = rest.partition("/")
            data = data[int(head)]
            continue
        matches = [key for key in data if rest == key or rest.startswith(key + "/")]
        if len(matches) != 1:
            raise KeyError(f"{path!r}: {'no' if not matches else 'several'} keys match at {rest!r}")
        data, rest = data[matches[0]], rest[len(matches[0]) + 1:]
    return data


def check_figure(figure: Figure) -> str | None:
    """Why a quoted figure does not match its results file, or None when it does."""
    file = ROOT / figure.results
    if not file.is_file():
        return f"{figure.where}: {figure.results} does not exist"
    try:
        data = json.loads(file.read_text())
        value = float(lookup(data, figure.path)) * figure.factor
        if figure.over is not None:
            value /= float(lookup(data, figure.over))
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        return f"{figure.where}: {figure.results}: {exc}"
    shown = Decimal(figure.shown.replace(",", ""))
    half_step = Decimal(10) ** shown.as_tuple().exponent / 2
    if abs(Decimal(repr(value)) - shown) > half_step * Decimal("1.000001"):
        return f"{figure.where}: shows {figure.shown}, but {figure.results} {figure.path} gives {value:.6g}"
    if not re.search(rf"(?<![\d.]){re.escape(figure.shown)}(?!\d|\.\d)", figure.covered):
        return f"{figure.where}: {figure.shown} does not appear in the table or paragraph after the annotation"
    return None


MEASURED = re.compile(r"(?<![\w.])\d[\d,]*\.\d+")  # 0.871, 3,542.1; not 2026-11-30 or 224
TABLE_ROW = re.compile(r"^\s*\|")
TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}")
TABLE_MARKERS = re.compile(r"(figures\s+\S|(illustrative|unchecked):\s*\S)")


@dataclass
class Table:
    """One Markdown table of a file's prose and the comments stacked right before it."""

    path: Path
    line: int  # 1-based line of its header row
    text: str
    comments: list[str]

    @property
    def where(self) -> str:
        return f"{shown_name(self.path)}:{self.line}"


def _comments_before(lines: list[str], index: int) -> list[str]:
    """The HTML comments stacked before ``lines[index]``, blank lines between them allowed."""
    comments = []
    while True:
        while index > 0 and not lines[index - 1].strip():
            index -= 1
        comment = _comment_before(lines, index)
        if comment is None:
            return comments
        comments.append(comment)
        index -= 1
        while "<!--" not in lines[index]:
            index -= 1


def tables(path: Path) -> list[Table]:
    """Every table of a Markdown file's prose (a header row, then a ``|---|`` rule)."""
    lines = prose(path).split("\n")
    found, i = [], 0
    while i < len(lines):
        if TABLE_ROW.match(lines[i]) and i + 1 < len(lines) and TABLE_RULE.match(lines[i + 1]):
            end = i + 2
            while end < len(lines) and TABLE_ROW.match(lines[end]):
                end += 1
            found.append(Table(path, i + 1, "\n".join(lines[i:end]), _comments_before(lines, i)))
            i = end
        else:
            i += 1
    return found


def unannotated(table: Table) -> str | None:
    """Why a table of measured figures is neither annotated nor marked, or None."""
    if not MEASURED.search(re.sub(r"`[^`]*`", "", table.text)):
        return None
    if any(TABLE_MARKERS.match(comment) for comment in table.comments):
        return None
    return (f"{table.where}: a table of measured figures needs <!-- figures bench/results/FILE.json ... --> "
            "right before it (or <!-- unchecked: REASON --> / <!-- illustrative: REASON -->)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings."""
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", prose(path), re.MULTILINE)}


def broken_link(source: Path, target: str) -> str | None:
    """Why a relative link from ``source`` does not resolve (file, then anchor), or None."""
    if re.match(r"[a-z]+:", target):
        return None  # http(s), mailto: not checked offline
    file, _, anchor = target.partition("#")
    resolved = (source.parent / file).resolve() if file else source
    if not resolved.exists():
        return f"{target}: no such file"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: no heading #{anchor} in {shown_name(resolved)}"
    return None


def links(path: Path) -> list[tuple[str, str]]:
    """(where, target) of every Markdown link and image in a file's prose."""
    text = prose(path)
    rel = shown_name(path)
    return [(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}", m.group(1) or m.group(2)) for m in LINK.finditer(text)]
