"""Every option at the boundary: every numeric option of every command driven with -1, 0,
nan, inf, 1e308 and a word gives exit 0 with a sensible result or one `error:` line with exit
2, never a traceback and never a chance-level head without a warning; `-q`/`--debug` work
after the command; output folders are created; small datasets train."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import click
import numpy as np
import pytest

from conftest import FAST_BACKBONE, FAST_EXTRACT, assert_clean_error, invoke, make_image_folder
from pipeline.cli import main
from pipeline.cli_options import FloatList, Shard
from pipeline.heads import LinearHead
from pipeline.store import read_features

REPO = Path(__file__).resolve().parents[1]
VALUES = ("-1", "0", "nan", "inf", "1e308", "word")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 colour classes with given train/val/test folders, extracted once."""
    root = tmp_path_factory.mktemp("options")
    data = make_image_folder(root / "data", splits={"train": 4, "val": 2, "test": 2}, size=24)
    features = root / "features.h5"
    assert invoke("extract", data, "--out", features, *FAST_EXTRACT).exit_code == 0
    head = root / "head.pt"
    assert invoke("train-head", features, "--out", head).exit_code == 0
    return root, data, features, head


def numeric_options():
    """(command name, option) for every option of every command whose value is a number or
    numbers, found in click's own command objects: a new option is covered without editing."""
    found = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            numeric = isinstance(param.type, (click.types._NumberParamTypeBase, FloatList, Shard))
            if isinstance(param, click.Option) and numeric and not param.is_flag:
                found.append((name, param))
    return found


def base_arguments(command, tiny, out: Path) -> list:
    """A quick, valid invocation of ``command`` writing under ``out`` (a command not listed
    here is run with no other arguments: still never a traceback)."""
    _, data, features, head = tiny
    return {
        "extract": [data, "--out", out / "f.h5", *FAST_EXTRACT],
        "train-head": [features, "--out", out / "h.pt"],
        "evaluate": ["--features", features, "--head", head, "--json", out / "m.json"],
        "report": ["--features", features, "--head", head, "--out", out / "r.html"],
        "predict": [data / "test", "--head", head],
        "bench": [data, *FAST_BACKBONE, "--epochs", 1, "--batch-size", 8, "--json", out / "b.json"],
        "make-dataset": ["digits", out / "digits", "--train-per-class", 2, "--test-per-class", 1],
        "merge": [features, "--out", out / "merged.h5"],
        "info": [features],
        "models": [],
        "export": ["--format", "torchscript", "--head", head, "--out", out / "m.pt"],
        "fewshot": [features, "--shots", "1,2", "--trials", 2, "--json", out / "f.json"],
        "compare": [features, features],
    }.get(command, [])


def with_option(arguments: list, flag: str, value: str) -> list:
    """``arguments`` with ``flag`` set to ``value`` (replacing the value it had there)."""
    arguments = [str(a) for a in arguments]
    if flag in arguments:
        i = arguments.index(flag)
        return arguments[:i] + [flag, value] + arguments[i + 2:]
    return arguments + [flag, value]


def test_every_command_has_its_numeric_options_found():
    found = {(name, param.name) for name, param in numeric_options()}
    assert {("extract", "batch_size"), ("train-head", "tol"), ("train-head", "grid"), ("predict", "topk"),
            ("bench", "lr"), ("make-dataset", "train_per_class")} <= found


@pytest.mark.parametrize("command, option", [(c, p.name) for c, p in numeric_options()])
def test_every_numeric_option_takes_any_value_without_a_traceback(tiny, tmp_path, command, option):
    param = next(p for c, p in numeric_options() if c == command and p.name == option)
    flag = max((o for o in param.opts if o.startswith("--")), key=len)
    accepted = []
    for value in VALUES:
        out = tmp_path / value
        out.mkdir()
        result = invoke(command, *with_option(base_arguments(command, tiny, out), flag, value))
        assert "Traceback" not in result.output, (command, flag, value, result.output)
        assert result.exit_code in (0, 2), (command, flag, value, result.output, result.exception)
        if result.exit_code == 2:
            assert_clean_error(result)
            continue
        accepted.append(value)
        assert result.exception is None
        if (out / "h.pt").exists():  # a head was saved: it learned something, or it says so
            head = LinearHead.load(out / "h.pt")
            features = read_features(tiny[2])
            rows = features.split != "test"
            accuracy = (head.predict(features.features[rows]) == features.labels[rows]).mean()
            chance = np.bincount(features.labels[rows]).max() / rows.sum()
            assert accuracy > chance or "warning: " in result.stderr, (flag, value, result.output)
    # values no option may take: not a finite number
    assert not {"nan", "inf", "word"} & set(accepted), (command, flag, accepted)


def test_a_huge_tolerance_saves_a_chance_level_head_only_with_a_warning(tiny, tmp_path):
    _, _, features, _ = tiny
    result = invoke("train-head", features, "--out", tmp_path / "h.pt", "--tol", "1e308")
    assert result.exit_code == 0
    assert "warning: the head is at chance level" in result.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["train-head", "--batch-size", "-5"], "--batch-size"),
    (["train-head", "--max-epochs", "0"], "--max-epochs"),
    (["train-head", "--head", "sklearn", "--max-iter", "-1"], "--max-iter"),
    (["train-head", "--grid", "0.1,nan"], "--grid"),
    (["train-head", "--grid", "1e308"], "L2 strengths"),
    (["train-head", "--tol", "inf"], "--tol"),
    (["extract", "--split-fractions", "0.5,0.5"], "--split-fractions"),
    (["extract", "--seed", "-1"], "--seed"),
    (["bench", "--lr", "1e308"], "--lr"),
])
def test_the_issue_examples_are_one_line_and_exit_2(tiny, tmp_path, argv, fragment):
    _, data, features, _ = tiny
    target = {"train-head": [features, "--out", tmp_path / "h.pt"], "extract": [data, "--out", tmp_path / "f.h5"],
              "bench": [data]}[argv[0]]
    result = invoke(argv[0], *target, *argv[1:])
    assert_clean_error(result, fragment)
    assert not (tmp_path / "h.pt").exists()


def test_presets_go_through_the_same_checks(tiny, tmp_path):
    _, _, features, _ = tiny
    preset = tmp_path / "p.toml"
    preset.write_text("[train-head]\nmax-iter = -3\n")
    assert_clean_error(invoke("train-head", features, "--out", tmp_path / "h.pt", "--config", preset), "max-iter")


# --------------------------------------------------------------------------- -q and --debug anywhere


@pytest.mark.parametrize("position", ["before", "after"])
def test_quiet_works_before_and_after_the_command(tmp_path, position):
    data = make_image_folder(tmp_path / "data", per_class=4, size=24)
    argv = ["extract", data, "--out", tmp_path / "f.h5", *FAST_EXTRACT]
    argv = ["-q", *argv] if position == "before" else [*argv, "-q"]
    result = invoke(*argv, quiet=False)
    assert result.exit_code == 0, result.output
    assert "img/s]" not in result.stderr and "it/s]" not in result.stderr  # no tqdm bar


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_works_before_and_after_the_command(tmp_path, position):
    argv = ["info", tmp_path / "missing.h5"]
    result = invoke(*(["--debug", *argv] if position == "before" else [*argv, "--debug"]))
    assert type(result.exception).__name__ == "PipeError"
    assert_clean_error(invoke(*argv))


def test_every_command_accepts_quiet_and_debug_after_it():
    for name, command in main.commands.items():
        flags = {opt for param in command.params for opt in param.opts}
        assert {"-q", "--quiet", "--debug"} <= flags, name


def test_quiet_and_debug_are_not_preset_keys(tiny, tmp_path):
    _, _, features, _ = tiny
    preset = tmp_path / "p.toml"
    preset.write_text("[train-head]\nquiet = true\n")
    assert_clean_error(invoke("train-head", features, "--config", preset), "unknown option")


# --------------------------------------------------------------------------- output folders


def test_missing_output_folders_are_created(tiny, tmp_path):
    _, _, features, _ = tiny
    head = tmp_path / "new" / "deeper" / "h.pt"
    assert invoke("train-head", features, "--out", head).exit_code == 0 and head.is_file()
    metrics = tmp_path / "other" / "m.json"
    assert invoke("evaluate", "--features", features, "--head", head, "--json", metrics).exit_code == 0
    assert json.loads(metrics.read_text())["accuracy"] >= 0


def test_an_output_folder_that_cannot_be_made_is_one_error_line(tiny, tmp_path):
    _, _, features, _ = tiny
    (tmp_path / "file").write_text("not a folder")
    assert_clean_error(invoke("train-head", features, "--out", tmp_path / "file" / "h.pt"), "file")
    assert_clean_error(invoke("evaluate", "--features", features, "--head", tiny[3], "--json",
                              tmp_path / "file" / "m.json"), "file")


# --------------------------------------------------------------------------- small datasets


def test_ten_classes_with_two_training_images_train_a_head(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=[f"c{i}" for i in range(10)],
                             splits={"train": 2, "test": 2}, size=24)
    assert invoke("extract", data, "--out", tmp_path / "f.h5", *FAST_EXTRACT).exit_code == 0
    result = invoke("train-head", tmp_path / "f.h5", "--out", tmp_path / "h.pt")
    assert result.exit_code == 0, result.output
    assert "chosen by 2-fold cross-validation over train + val (20 images)), trained in" in result.stdout
    assert LinearHead.load(tmp_path / "h.pt").training["selection"]["method"] == "cv"


def test_a_tiny_automatic_split_warns_and_trains_by_cross_validation(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4, size=24)
    extract = invoke("extract", data, "--out", tmp_path / "f.h5", *FAST_EXTRACT)
    assert extract.exit_code == 0
    warnings = [line for line in extract.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "3 val images, 1 to 1 per class" in warnings[0] and "test" in warnings[1]
    split = read_features(tmp_path / "f.h5", with_features=False)
    for label in range(3):  # every class keeps training images
        assert ((split.labels == label) & (split.split == "train")).sum() == 2
    result = invoke("train-head", tmp_path / "f.h5", "--out", tmp_path / "h.pt")
    assert result.exit_code == 0 and "3-fold cross-validation" in result.stdout


def test_given_splits_do_not_warn_about_their_size(tiny):
    _, data, features, _ = tiny
    result = invoke("extract", data, "--out", features, *FAST_EXTRACT)
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_one_image_per_class_fits_the_default_with_a_warning(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=1, size=24)
    assert invoke("extract", data, "--out", tmp_path / "f.h5", *FAST_EXTRACT).exit_code == 0
    result = invoke("train-head", tmp_path / "f.h5", "--out", tmp_path / "h.pt")
    assert result.exit_code == 0
    assert "(the default: nothing could be chosen" in result.stdout
    assert "warning: too few images to choose the L2 strength" in result.stderr


def test_the_declared_python_is_the_one_the_code_needs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # tomllib (pipeline/config.py) is 3.11+


def test_info_shows_how_the_strength_was_chosen_and_the_warnings(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=1, size=24)
    assert invoke("extract", data, "--out", tmp_path / "f.h5", *FAST_EXTRACT).exit_code == 0
    assert invoke("train-head", tmp_path / "f.h5", "--out", tmp_path / "h.pt").exit_code == 0
    lines = invoke("info", tmp_path / "h.pt").stdout.splitlines()
    assert any(line.startswith("selection     default (") for line in lines)
    assert any(line.startswith("warning       too few images to choose the L2 strength") for line in lines)
