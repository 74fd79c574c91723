"""The docs cannot rot: README.md and docs/*.md are run, and checked against the CLI and the
benchmark results (tests/markdown_docs.py reads them; docs/architecture.md says how to mark a
block).

* Every fenced block runs here or is marked illustrative with a reason. Shell blocks of ``pipe``
  commands run command by command, in order, in one temporary folder per page (see
  :func:`workspace`); ``python`` blocks run there with ``pipeline`` importable.
* Every ``pipe COMMAND --option`` the docs name exists in the CLI.
* Every annotated figure matches its file in bench/results/, and every table of measured figures
  on the pages that quote them is annotated (or marked with the reason it is not).
* Every relative link resolves, and every command's ``--help`` names an existing page.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from conftest import COLOURS, FAST_BACKBONE, invoke, make_image_folder, write_image
from markdown_docs import (ROOT, Block, bare_options, broken_link, check_figure, command_lines, doc_files,
                           fenced_blocks, figures, links, pipe_calls, split_command, tables, unannotated)
from pipeline.cli import main
from pipeline.cli_options import DOCS_INDEX, DOCS_PAGES

DOCS = doc_files()
MEASURED_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("performance*.md"))]  # pages that quote runs
BACKBONE_OPTIONS = ("--model", "--weights", "--image-size")  # replaced by FAST_BACKBONE
TINY_DATASET = ("--train-per-class", "3", "--test-per-class", "2")  # pipe make-dataset


def substitute(args: list[str]) -> list[str]:
    """A documented command made small and offline (the substitutions docs/architecture.md
    lists): a random-weight resnet18 at 32 px with no DataLoader workers instead of the model
    the text names, and a few scikit-learn digits per class instead of a dataset download."""
    args, flags = list(args), []
    while args and args[0].startswith("-"):  # `pipe -q extract ...`
        flags.append(args.pop(0))
    command = args[0] if args else None
    if command in ("extract", "bench"):
        kept, skip = [], False
        for arg in args:
            if skip:
                skip = False
            elif arg in BACKBONE_OPTIONS or arg == "--workers":
                skip = True
            elif not arg.startswith(tuple(f"{o}=" for o in (*BACKBONE_OPTIONS, "--workers"))):
                kept.append(arg)
        args = kept + list(FAST_BACKBONE) + (["--workers", "0"] if command == "extract" else [])
    if command == "make-dataset":
        args = ["make-dataset", "digits", args[2], *TINY_DATASET]
    return flags + args


def run_shell_block(block: Block, commands: list[str]) -> None:
    """Each ``pipe`` command in-process (quiet), in the current folder; ``pip install`` lines
    are not run: the test environment has the dev extra, which holds every optional package."""
    for line in commands:
        args = split_command(line)
        if args[0] == "pip":
            continue
        expanded = []
        for arg in map(os.path.expandvars, args[1:]):
            matches = sorted(glob.glob(arg)) if "*" in arg else []
            expanded += matches or [arg]  # as the shell expands a pattern, or leaves it
        result = invoke(*substitute(expanded))
        assert result.exit_code == 0, f"{block.where}: `{line}` exited {result.exit_code}:\n{result.output}"


def run_python_block(block: Block) -> None:
    """A ``python`` block in this process (``pipeline`` importable), or, marked ``run as``,
    saved under its file name and run with the interpreter of the tests."""
    if block.marker == "run as":
        args = split_command(block.marker_value)
        script = next(a for a in args if a.endswith(".py"))
        Path(script).write_text(block.text)
        done = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{block.where}: `{block.marker_value}` failed:\n{done.stdout}{done.stderr}"
        return
    try:
        exec(compile(block.text, block.where, "exec"), {"__name__": "__docs__"})
    except Exception:
        raise AssertionError(f"{block.where}: the Python block failed:\n{traceback.format_exc()}") from None


def classify(block: Block) -> str:
    """The block's kind: illustrative, python, shell, or unmarked (neither runs nor is marked)."""
    if block.marker == "illustrative":
        return "illustrative"
    if block.lang == "python":
        return "python"
    return "shell" if command_lines(block) else "unmarked"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """What the docs' commands read, made once for this module: ``data/`` (3 colour
    classes x 8 PNGs), ``photo.jpg``, ``images.csv`` (a manifest of data/), ``photos.csv`` (a
    multi-label manifest of ``photos/``), and ``cache/features.h5`` and ``cache/head.pt`` made
    from ``data/``: the docs' commands assume both exist."""
    root = tmp_path_factory.mktemp("doc-inputs")
    make_image_folder(root / "data")
    write_image(root / "photo.jpg", COLOURS["red"], seed=99)
    rows = [f"{p.relative_to(root)},{p.parent.name}" for p in sorted((root / "data").rglob("*.png"))]
    (root / "images.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    names = list(COLOURS)
    rng = np.random.default_rng(0)
    rows = []
    for n in range(36):
        labels = [c for c in names if rng.random() < 0.5] or [names[n % 3]]
        colour = np.mean([COLOURS[c] for c in labels], axis=0).astype(int)
        path = write_image(root / "photos" / f"{n:04d}.png", tuple(colour), seed=200 + n)
        split = "train" if n < 24 else "val" if n < 30 else "test"
        rows.append(f"{path.relative_to(root)},{'|'.join(labels)},{split}")
    (root / "photos.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    for args in (("extract", root / "data", *FAST_BACKBONE, "--workers", "0", "--out", root / "cache" / "features.h5"),
                 ("train-head", root / "cache" / "features.h5", "--out", root / "cache" / "head.pt")):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def workspace(prepared, tmp_path, monkeypatch) -> Path:
    """A fresh copy of :func:`prepared` as the current folder, so that no page sees another's
    outputs."""
    root = tmp_path / "work"
    shutil.copytree(prepared, root)
    monkeypatch.chdir(root)
    return root


def test_every_fenced_block_runs_or_is_marked_illustrative():
    """The count the issue asks for: every block is of a kind the suite runs, or marked with a
    reason; a block that is neither is named."""
    kinds = {}
    for path in DOCS:
        for block in fenced_blocks(path):
            kinds.setdefault(classify(block), []).append(block)
    unmarked = [b.where for b in kinds.get("unmarked", [])]
    assert not unmarked, f"blocks that neither run nor are marked <!-- illustrative: REASON -->: {unmarked}"
    no_reason = [b.where for b in kinds.get("illustrative", []) if not b.marker_value]
    assert not no_reason, f"illustrative blocks without a reason: {no_reason}"
    run = len(kinds.get("shell", [])) + len(kinds.get("python", []))
    assert run >= 10, f"only {run} blocks run"  # README and docs hold at least this many today


RUN_PAGES = [p for p in DOCS if any(classify(b) in ("shell", "python") for b in fenced_blocks(p))]


def test_blocks_are_told_apart(tmp_path):
    """What the count above relies on: a block of anything but pipe commands is unmarked until
    an illustrative marker (with its reason) precedes it; transcripts run their $ lines."""
    page = tmp_path / "page.md"
    page.write_text("```\nmake demo\n```\n\n"
                    "<!-- illustrative: needs a GPU -->\n```\npipe extract d/ --device cuda\n```\n\n"
                    "```\n$ pipe info cache/features.h5\nfeatures: 24 x 512\n```\n\n"
                    "```python\nimport pipeline\n```\n")
    blocks = fenced_blocks(page)
    assert [classify(b) for b in blocks] == ["unmarked", "illustrative", "shell", "python"]
    assert blocks[1].marker_value == "needs a GPU"
    assert command_lines(blocks[2]) == ["pipe info cache/features.h5"]


@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_blocks_of_the_page_run(page, workspace):
    """Every block of the page that is not illustrative runs, in order, in one folder."""
    for block in fenced_blocks(page):
        kind = classify(block)
        if kind == "shell":
            run_shell_block(block, command_lines(block))
        elif kind == "python":
            run_python_block(block)


def cli_options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}


def test_every_pipe_command_and_option_in_the_docs_exists():
    """Renaming a command or an option without updating the docs fails here (fenced blocks,
    illustrative ones too, and inline code spans; a span naming an option alone, `--tol 1e-5`,
    must name an option of some command)."""
    problems, checked = [], 0
    for path in DOCS:
        for call in pipe_calls(path):
            command = main.commands.get(call.command) if call.command else main
            if command is None:
                problems.append(f"{call.where}: no command `pipe {call.command}` ({call.text})")
                continue
            unknown = [o for o in call.options if o not in cli_options(command)]
            unknown += [o for o in call.global_options if o not in cli_options(main)]
            problems += [f"{call.where}: `pipe {call.command or ''}` has no option {o} ({call.text})" for o in unknown]
            checked += 1
    every_option = set().union(*(cli_options(c) for c in (main, *main.commands.values())))
    problems += [f"{where}: no command has the option {option}"
                 for path in DOCS for where, option in bare_options(path) if option not in every_option]
    assert not problems, "\n".join(problems)
    assert checked > 50


def test_the_option_check_catches_a_renamed_option(tmp_path):
    """The check above is not vacuous: a page naming an option the CLI lacks is caught, in a
    block and in a code span."""
    page = tmp_path / "page.md"
    page.write_text("Use `pipe train-head --no-such-option`.\n\n```\npipe extract data/ --out-file x.h5\n```\n")
    calls = pipe_calls(page)
    assert {o for c in calls for o in c.options if o not in cli_options(main.commands[c.command])} == \
        {"--no-such-option", "--out-file"}


def test_quoted_figures_match_their_results_files():
    annotated = [f for path in DOCS for f in figures(path)]
    problems = [p for p in map(check_figure, annotated) if p]
    assert not problems, "\n".join(problems)
    pages = {f.where.split(":")[0] for f in annotated}
    assert {"README.md", "docs/performance.md", "docs/performance-heads.md"} <= pages


def test_a_figure_that_disagrees_with_its_file_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- figures bench/results/extract-cpu-2core.json\n0.91 = speed/efficientnet_lite0/c/achievable\n"
                    "0.90 = speed/efficientnet_lite0/c/achievable\n-->\n| ratio |\n|---|\n| 0.91 |\n")
    problems = [check_figure(f) for f in figures(page)]
    assert "gives 0.896664" in problems[0]  # the number is wrong
    assert "does not appear" in problems[1]  # the number is right but not in the table


def test_a_ratio_of_two_figures_is_checked_against_both(tmp_path):
    """``SHOWN = A over B``: 123.9 / 29.5 img/s in the bfloat16 extraction run is 4.19."""
    page = tmp_path / "page.md"
    ratio = "speed/efficientnet_lite0/pipe over speed/efficientnet_lite0/peer"
    page.write_text(f"<!-- figures bench/results/extract-bf16-cpu-2core.json\n4.19 = {ratio}\n4.2 = {ratio} * 1.1\n-->\n"
                    "| ratio |\n|---|\n| 4.19 4.2 |\n")
    problems = [check_figure(f) for f in figures(page)]
    assert problems[0] is None
    assert "gives 4.61" in problems[1]


def test_every_table_of_measured_figures_is_annotated():
    """On the README and the performance pages, a table with a measured number says which
    results file it comes from, so that test above checks it, or says why not."""
    checked = [t for path in MEASURED_PAGES for t in tables(path)]
    problems = [p for p in map(unannotated, checked) if p]
    assert not problems, "\n".join(problems)
    assert len(checked) > 20


def test_an_unannotated_table_of_figures_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("| run | s |\n|---|---|\n| a | 1.5 |\n\n"  # measured, bare: caught
                    "<!-- unchecked: re-measured later -->\n\n| run | s |\n|---|---|\n| b | 2.5 |\n\n"
                    "<!-- unchecked: -->\n| run | s |\n|---|---|\n| c | 3.5 |\n\n"  # no reason: caught
                    "<!-- figures bench/results/x.json\n1.5 = a\n-->\n| run | s |\n|---|---|\n| d | 1.5 |\n\n"
                    "| option | default |\n|---|---|\n| `--tol` | `1e-4`, `0.5` |\n")  # no measurement
    assert [t.line for t in tables(page) if unannotated(t)] == [1, 12]


def test_links_resolve():
    problems = [f"{where}: {why}" for path in DOCS for where, target in links(path)
                if (why := broken_link(path, target))]
    assert not problems, "\n".join(problems)


def test_size_targets():
    """A README a newcomer reads in five minutes; no page of docs/ over 400 lines."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    long = {p.name: n for p in DOCS[1:] if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_command_help_names_its_docs_page():
    assert set(DOCS_PAGES) == set(main.commands), "each command needs a page in DOCS_PAGES"
    for name, page in {**DOCS_PAGES, None: DOCS_INDEX}.items():
        assert broken_link(ROOT / "README.md", page) is None, page
        result = invoke(*([name] if name else []), "--help")
        assert result.exit_code == 0, result.output
        assert f"Docs: {page}" in result.output, result.output
