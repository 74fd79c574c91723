"""Human-readable summaries of the two hand-over files (features .h5, head .pt)."""

from __future__ import annotations

from pathlib import Path

from .errors import PipeError
from .heads import load_head
from .store import images_per_second, is_feature_file, read_features


def _describe_features(path: Path, show_failed: bool) -> list[str]:
    fs = read_features(path, with_features=False, with_paths=False)
    counts = ", ".join(f"{k} {v}" for k, v in fs.split_counts().items())
    lines = [
        f"feature file  {path}",
        f"model         {fs.attrs['model']} (weights {fs.attrs['weights']}: {fs.attrs['weights_id']})",
        f"features      {len(fs)} x {fs.attrs['feature_dim']} {fs.attrs['dtype']}  ({counts})",
        f"precision     {fs.precision}" + ("" if "precision" in fs.attrs else " (file written before pipe recorded it)"),
        f"transform     {fs.attrs['transform']}",
        f"classes       {len(fs.classes)}: {', '.join(fs.classes)}"
        + (f" (multi-label: {fs.targets.sum() / max(len(fs), 1):.2f} labels per image)" if fs.multilabel else ""),
        f"fingerprint   {fs.fingerprint}",
        f"extraction    {_extraction(fs.attrs)}",
        f"failed        {len(fs.failed_paths)} image(s)" + ("" if show_failed or not fs.failed_paths
                                                            else " (list them with --failed)"),
    ]
    if show_failed:
        lines += [f"  {p}: {e}" for p, e in zip(fs.failed_paths, fs.failed_errors)]
    return lines


def _extraction(attrs: dict) -> str:
    record = attrs.get("extraction")
    if not record:
        return "speed not recorded (file written before pipe recorded it)"
    rate = images_per_second(attrs)
    return f"{record['images']} images in {record['seconds']:.1f} s on {record['device']}" + \
        (f" ({rate:.1f} img/s)" if rate else "")


def _describe_head(path: Path) -> list[str]:
    head = load_head(path)
    t = head.training
    lines = [
        f"head file     {path}",
        f"shape         {head.describe()}",
        f"trained on    {head.source.get('model')} features, fingerprint {head.fingerprint}",
        f"classes       {', '.join(head.classes)}",
    ]
    lines += [f"{key:<13} {value}" for key, value in t.items() if not isinstance(value, (list, dict))]
    selection = t.get("selection")  # heads trained before selection was recorded have none
    if selection:
        folds = f", {selection['folds']} folds" if selection["method"] == "cv" else ""
        reason = f" ({selection['reason']})" if selection.get("reason") else ""
        lines.append(f"{'selection':<13} {selection['method']}{folds}{reason}")
    lines += [f"{'warning':<13} {warning}" for warning in t.get("warnings", [])]
    return lines


def describe(path, show_failed: bool = False) -> str:
    """A few lines about a feature file or a head file."""
    path = Path(path)
    if not path.is_file():
        raise PipeError(f"{path} does not exist")
    if is_feature_file(path):
        return "\n".join(_describe_features(path, show_failed))
    if show_failed:
        raise PipeError(f"--failed applies to feature files; {path} is not one")
    return "\n".join(_describe_head(path))
