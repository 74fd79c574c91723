"""The ``pipe`` command line: parse, call a library function, print. Nothing else lives here."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import __version__, defaults
from .allocator import keep_large_buffers
from .cli_options import (DOCS_INDEX, MAX_LR, MAX_TRIALS, MAX_WORKERS, POSITIVE, SEED, ByteSize, FiniteFloat, FloatList, IntList,
                          NameList, PipeGroup, Shard, backbone_options, config_option, device_option, ensure_parent,
                          global_flags, precision_option, show_debug_log)
from .cpu_sharing import let_threads_sleep


@click.group(cls=PipeGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=f"\b\nDocs: {DOCS_INDEX} (a page per concern in docs/).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="pipe")
@click.pass_context
def main(ctx, quiet, debug):
    """Transfer learning by feature extraction: extract once, train heads in seconds."""
    keep_large_buffers()  # before torch allocates anything: see pipeline.allocator
    if debug:
        show_debug_log()
    if ctx.invoked_subcommand in ("extract", "predict", "serve"):
        let_threads_sleep()  # before torch loads: see pipeline.cpu_sharing
    ctx.obj = {"quiet": quiet, "debug": debug}


@main.command()
@global_flags
@click.argument("data", required=False, type=click.Path(file_okay=False))
@click.option("--manifest", "manifest_file", default=None, type=click.Path(dir_okay=False),
              help="A CSV, TSV or Parquet table of the images (columns path, label, optional split) instead of DATA.")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="Folder the manifest's relative paths start from [default: the manifest's folder].")
@click.option("--label-sep", default=defaults.LABEL_SEP, show_default=True,
              help="Separates the labels of a multi-label manifest cell.")
@backbone_options
@click.option("--out", default=defaults.FEATURES, show_default=True, type=click.Path(dir_okay=False))
@click.option("--batch-size", default=None, type=POSITIVE, help="Images per forward pass [default: 32 on CPU, 256 on CUDA].")
@click.option("--workers", default=None, type=click.IntRange(0, MAX_WORKERS),
              help="DataLoader workers [default: CPU cores, at most 8].")
@device_option
@precision_option
@click.option("--dtype", default=defaults.FEATURE_DTYPE, show_default=True, type=click.Choice(["float16", "float32"]),
              help="Storage dtype of the features.")
@click.option("--split-fractions", default=defaults.SPLIT_FRACTIONS, type=FloatList(0, 1, count=3),
              show_default=",".join(map(str, defaults.SPLIT_FRACTIONS)),
              help="train,val,test fractions when the folder has no train/val/test sub-folders.")
@click.option("--seed", default=defaults.SEED, show_default=True, type=SEED, help="Seed of the split.")
@click.option("--overwrite", is_flag=True, help="Replace an output made with other settings.")
@click.option("--strict", is_flag=True, help="Fail if any image cannot be read.")
@click.option("--checkpoint-every", default=defaults.CHECKPOINT_EVERY, show_default=True, type=POSITIVE,
              help="Commit progress every N images (resume point after a crash).")
@click.option("--full-decode/--draft-decode", default=None,
              help="Decode JPEGs at full size, or at a reduced DCT scale when much larger than the input "
                   "[default: full on CUDA, where the GPU decodes them; reduced on the CPU].")
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the model: ~1 min to compile, faster forward (for long runs).")
@click.option("--shard", default=None, type=Shard(),
              help="Extract only shard I of N into --out (combine shards with `pipe merge`).")
@click.option("--layer", default=None,
              help="Take features from this layer (torchvision graph node/module, timm feature module), pooled.")
@click.option("--pool", default=None, type=click.Choice(["avg", "max", "cls", "mean-tokens"]),
              help="Pooling: avg/max for feature maps, cls/mean-tokens for transformers [default: the model's].")
@click.option("--tta", default=None, type=click.Choice(["hflip"]),
              help="hflip: average the features of each image and its mirror image.")
@config_option
@click.pass_obj
def extract(obj, data, **options):
    """Run the frozen backbone once over DATA (or a --manifest table) and cache pooled features (HDF5)."""
    from .extract import extract_features

    s = extract_features(data, progress=not obj["quiet"], **options)
    if s.rank:
        return
    for warning in s.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not s.written:
        click.echo(f"{s.out} is up to date: {s.total - len(s.failed)} images, nothing to extract "
                   f"({len(s.failed)} skipped)")
        return
    rate = f", {s.images_per_second:.1f} img/s" if s.extracted else ""
    click.echo(f"{s.extracted} extracted, {s.reused} reused, {len(s.failed)} skipped -> {s.out} "
               f"({s.seconds:.1f} s{rate})")
    if s.failed:
        click.echo(f"skipped images are listed by `pipe info {s.out} --failed`", err=True)


@main.command()
@global_flags
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", default=defaults.FEATURES, show_default=True, type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def merge(shards, out, overwrite):
    """Merge shard files of `pipe extract --shard I/N` into one feature file."""
    from .store import merge_feature_files

    merged = merge_feature_files(shards, out, overwrite)
    click.echo(f"merged {len(shards)} shards: {len(merged)} images, {len(merged.failed_paths)} skipped -> {out}")


@main.command("train-head")
@global_flags
@click.argument("features", default=defaults.FEATURES, type=click.Path(dir_okay=False))
@click.option("--out", default=defaults.HEAD, show_default=True, type=click.Path(dir_okay=False))
@click.option("--head", "kind", default=defaults.HEAD_KIND, show_default=True,
              type=click.Choice(defaults.HEAD_KINDS),
              help="linear: batched torch sweep; sklearn: LogisticRegression baseline; knn: weighted cosine "
                   "k-nearest-neighbours.")
@click.option("--grid", default=None, type=FloatList(0, positive=True),
              help="Linear heads: L2 strengths to sweep [default: 16-point log grid].")
@click.option("--k", "k", default=None, type=IntList(1),
              help=f"kNN head: k to choose from [default: {','.join(map(str, defaults.KNN_KS))}].")
@click.option("--temperature", default=None, type=FiniteFloat(min=0, min_open=True),
              help=f"kNN head: each neighbour votes exp(similarity / T) [default: {defaults.KNN_TEMPERATURE}].")
@click.option("--selection", default=defaults.SELECTION, show_default=True, type=click.Choice(["auto", "val", "cv"]),
              help="How the strength or k is chosen: auto (val when it holds enough images, else a hold-out or "
                   "k-fold cross-validation over train + val), val (val or a hold-out), cv (k-fold).")
@click.option("--balanced", is_flag=True, help="Weight classes inversely to their frequency.")
@click.option("--seed", default=defaults.SEED, show_default=True, type=SEED)
@device_option
@click.option("--max-iter", default=None, type=POSITIVE,
              help="L-BFGS iterations per fit [default: "
                   + ", ".join(f"{n} {kind}" for kind, n in defaults.MAX_ITER.items()) + "].")
@click.option("--tol", default=None, type=FiniteFloat(min=0, min_open=True),
              help=f"Stop when the largest gradient entry is below this [{defaults.TOL:g}].")
@click.option("--batch-size", default=None, type=POSITIVE,
              help="Linear head: train on mini-batches streamed from the file (features larger than memory).")
@click.option("--max-epochs", default=None, type=POSITIVE,
              help=f"Mini-batch path: most epochs (early stopping on val) [{defaults.MAX_EPOCHS}].")
@click.option("--memory-budget", default=None, type=ByteSize(),
              help="Memory the train and val rows may fill (512M, 4G); above it the solver reads them from the "
                   "file on every pass [default: half the available memory].")
@config_option
def train_head(features, out, kind, **params):
    """Train a head on cached FEATURES, choosing its L2 strength (or k) on validation data
    (multi-label files: one logistic head per class with its own threshold)."""
    from .heads.selection import Selection
    from .memory import format_size
    from .train import train_head as train

    params = {k: v for k, v in params.items() if v is not None and v is not False}  # unset options and flags
    if kind == "sklearn":
        params.pop("device", None)
    head = train(features, head=kind, out=out, **params)
    record = head.training
    name = record["parameter"]
    chosen_value, selection = record[name], Selection(**record["selection"])

    def shown(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    if record["grid_scores"]:
        label = f"{'cv' if selection.method == 'cv' else 'val'} {record['score']}"
        click.echo(f"{name:<10}  {label}")
        sweep_stops = record.get("stop", {}).get("sweep") or [None] * len(record["grid_scores"])  # L-BFGS heads only
        for (value, score), stop in zip(record["grid_scores"], sweep_stops):
            note = f"  (stopped: {stop})" if stop not in (None, "converged") else ""
            mark = "  <- chosen" if value == chosen_value else ""
            click.echo(f"{shown(value):<10}  {score:.4f}{note}{mark}")
        chosen = f"{label} {dict(map(tuple, record['grid_scores']))[chosen_value]:.4f}, {selection.describe()}"
    else:
        chosen = selection.describe()
    if record.get("scored_sample"):
        click.echo(f"(scored on a seeded sample of {record['scored_sample']:,} images per split: too many references "
                   "to score them all)")
    memory = record.get("memory")
    if memory and not memory["in_memory"] and kind != "knn" and "batch_size" not in params:
        click.echo(f"train + val rows ({format_size(memory['rows_bytes'])}) above the memory budget "
                   f"({format_size(memory['budget'])}): read from the file on every pass")
    what = f"{kind} multi-label" if head.kind == "multilabel" else kind
    click.echo(f"{what} head: {name} {shown(chosen_value)} ({chosen}), trained in {record['seconds']:.2f} s -> {out}")
    for warning in record["warnings"]:
        click.echo(f"warning: {warning}", err=True)


@main.command()
@global_flags
@click.option("--features", default=defaults.FEATURES, show_default=True, type=click.Path(dir_okay=False))
@click.option("--head", default=defaults.HEAD, show_default=True, type=click.Path(dir_okay=False))
@click.option("--split", default=defaults.SPLIT, show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--json", "json_path", default=defaults.METRICS, show_default=True, type=click.Path(dir_okay=False))
@click.option("--ci", is_flag=True, help="Bootstrap 95% intervals (1,000 seeded resamples) of accuracy, "
                                         "balanced accuracy and macro-F1.")
@config_option
def evaluate(features, head, split, json_path, ci):
    """Score a head on a split of the cached features; print and save metrics."""
    from .evaluate import evaluate as evaluate_head
    from .metrics import format_multilabel_report, format_report

    report = evaluate_head(head, features, split=split, ci=ci)
    click.echo(format_multilabel_report(report) if "mAP" in report else format_report(report))
    Path(ensure_parent(json_path)).write_text(json.dumps(report, indent=2))
    click.echo(f"metrics -> {json_path}")


@main.command()
@global_flags
@click.option("--features", default=defaults.FEATURES, show_default=True, type=click.Path(dir_okay=False))
@click.option("--head", default=defaults.HEAD, show_default=True, type=click.Path(dir_okay=False))
@click.option("--split", default=defaults.SPLIT, show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--out", default=defaults.REPORT, show_default=True, type=click.Path(dir_okay=False))
@click.option("--seed", default=defaults.SEED, show_default=True, type=SEED,
              help="Seed of the bootstrap, of the label-issue folds and of the sample of map points.")
@config_option
def report(features, head, split, out, seed):
    """Write one self-contained HTML page about a head on a split: metrics, mistakes, data issues."""
    from .report import write_report

    result = write_report(features, head, split, ensure_parent(out), seed)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"accuracy {result.accuracy:.4f} on {result.n} {split} images, {result.mistakes} mistakes, "
               f"{result.label_issues} label issues, {result.duplicates} duplicates across splits")
    click.echo(f"report -> {result.out} ({result.bytes / 1e6:.2f} MB, {result.seconds:.1f} s)")


@main.command()
@global_flags
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--head", default=defaults.HEAD, show_default=True, type=click.Path(dir_okay=False))
@click.option("--topk", default=defaults.TOPK, show_default=True, type=POSITIVE,
              help="Classes shown per image (a multi-label head shows every class above its threshold).")
@device_option
@precision_option
@click.option("--batch-size", default=defaults.PREDICT_BATCH_SIZE, show_default=True, type=POSITIVE)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write each image's top-k classes and probabilities as JSON.")
@config_option
def predict(inputs, head, topk, device, precision, batch_size, json_path):
    """Classify images (files or folders) with a trained head and its backbone."""
    from .heads import load_head
    from .predict import predict_images, predictions_json

    head = load_head(head)
    predictions = predict_images(head, inputs, topk, device, batch_size, precision=precision)
    for p in predictions:
        if p.error:
            click.echo(f"{p.path}: skipped ({p.error})")
        else:
            shown = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top)
            click.echo(f"{p.path}: {shown or '(no class reaches its threshold)'}")
    if json_path:
        Path(ensure_parent(json_path)).write_text(json.dumps(predictions_json(predictions, head), indent=2))
        click.echo(f"predictions -> {json_path}")


@main.command()
@global_flags
@click.option("--head", default=defaults.HEAD, show_default=True, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens it to the network (pair it with --api-key-env).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--max-batch", default=None, type=POSITIVE,
              help="Most images per forward pass [default: 32 on CPU, 256 on CUDA].")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=FiniteFloat(min=0),
              help="How long a forward pass waits for more requests to fill its batch.")
@click.option("--max-body-mb", default=20.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Larger request bodies get 413.")
@click.option("--max-queue", default=128, show_default=True, type=POSITIVE,
              help="Requests in progress at once; more get 503 with Retry-After.")
@click.option("--topk", default=defaults.TOPK, show_default=True, type=POSITIVE,
              help="Classes per image when a request gives no ?topk=.")
@device_option
@click.option("--api-key-env", default=None, metavar="NAME",
              help="Require the header Authorization: Bearer <the key in environment variable NAME>.")
@config_option
@click.pass_obj
def serve(obj, head, host, port, api_key_env, **settings):
    """Serve a trained head over HTTP: POST /predict (images), GET /health, GET /info (needs the
    serve extra: pip install 'pipe[serve]')."""
    from .serve import ServeSettings, api_key_from_env, serve_head

    serve_head(head, host, port, ServeSettings(**settings, api_key=api_key_from_env(api_key_env)), obj["quiet"])


@main.command()
@global_flags
@click.argument("features", default=defaults.FEATURES, type=click.Path(dir_okay=False))
@click.option("--shots", default="1,2,5,10,20", show_default=True, type=IntList(1),
              help="Training images per class to draw.")
@click.option("--trials", default=5, show_default=True, type=click.IntRange(2, MAX_TRIALS),
              help="Seeded draws per shot count (the 95% interval is over them).")
@click.option("--heads", default="linear,knn", show_default=True, type=NameList(defaults.HEAD_KINDS),
              help="Head kinds to fit on each draw.")
@click.option("--seed", default=defaults.SEED, show_default=True, type=SEED)
@device_option
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help='Write {"shots", "trials", "<head>": {"mean", "ci95", "per_trial"}} as JSON.')
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Draw the curves as a PNG (needs matplotlib: pip install 'pipe[plot]').")
@config_option
def fewshot(features, shots, trials, heads, seed, device, json_path, plot_path):
    """Few-shot curves: test accuracy of each head against training images per class."""
    from .fewshot import format_fewshot, plot_fewshot, run_fewshot
    from .plotting import pyplot

    if plot_path:
        pyplot()  # before the work: the install hint comes at once
    result = run_fewshot(features, shots, trials, heads, seed, device)
    for line in result.skipped:
        click.echo(f"warning: {line}", err=True)
    click.echo(format_fewshot(result))
    click.echo(f"{len(result.shots)} shot counts x {trials} trials x {len(heads)} heads in {result.seconds:.1f} s")
    if json_path:
        Path(ensure_parent(json_path)).write_text(json.dumps(result.to_dict(), indent=2))
        click.echo(f"results -> {json_path}")
    if plot_path:
        click.echo(f"plot -> {plot_fewshot(result, ensure_parent(plot_path))}")


@main.command()
@global_flags
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the ranking as JSON.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@click.option("--seed", default=defaults.SEED, show_default=True, type=SEED)
@device_option
def compare(files, json_path, markdown, seed, device):
    """Rank feature files of the same images (backbones, layers, pooling) by test accuracy."""
    from .compare import compare_features, comparison_json, format_comparison

    contenders = compare_features(files, seed, device)
    click.echo(format_comparison(contenders, markdown))
    if json_path:
        Path(ensure_parent(json_path)).write_text(json.dumps(comparison_json(contenders), indent=2))
        click.echo(f"ranking -> {json_path}")


@main.command()
@global_flags
@click.option("--head", default=defaults.HEAD, show_default=True, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", default=None, type=click.Choice(["onnx", "torchscript"]),
              help="onnx (needs the export extra: pip install 'pipe[export]') or torchscript. Required.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Output file [default: beside the head, HEAD.onnx or HEAD.torchscript.pt].")
@click.option("--opset", default=None, type=click.IntRange(7, 30), help="ONNX opset [default: the exporter's].")
def export(head, fmt, out, opset):
    """Write backbone + head as one ONNX or TorchScript file: uint8 images in, probabilities out."""
    from .export import export_head, require_onnx
    from .heads import load_head

    if fmt is None:  # checked here: click's own message for a missing choice spans several lines
        raise click.UsageError("--format is required: onnx or torchscript")
    if opset is not None and fmt != "onnx":
        raise click.UsageError("--opset applies to --format onnx only")
    if fmt == "onnx":
        require_onnx()  # before loading anything: the install hint comes at once
    result = export_head(load_head(head), fmt, out, opset)
    t = result.metadata["transform"]
    checked = ("not checked (onnxruntime is not installed)" if result.max_difference is None
               else f"checked: max |Δp| {result.max_difference:.1e} against pipe's model")
    click.echo(f"{result.metadata['model']} + {result.metadata['kind']} head ({len(result.metadata['classes'])} classes) "
               f"-> {', '.join(map(str, result.files))} ({fmt}{f' opset {result.opset}' if result.opset else ''}, "
               f"{result.seconds:.1f} s; {checked})")
    click.echo(f"input: uint8 (N, 3, {t['crop']}, {t['crop']}) RGB, resized to {t['resize']} ({t['interpolation']}) "
               f"and centre-cropped; output: probabilities (N, {len(result.metadata['classes'])})")


@main.command()
@global_flags
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--failed", "show_failed", is_flag=True, help="List images that could not be read.")
def info(file, show_failed):
    """Summarise a feature file (.h5) or a head file (.pt)."""
    from .info import describe

    click.echo(describe(file, show_failed))


@main.command()
@global_flags
@click.option("--family", default=None, help="Only this family or names containing it, e.g. resnet, vit.")
@click.option("--offline", is_flag=True, help="Only backbones whose weights are available offline now.")
@click.option("--timm", "include_timm", is_flag=True,
              help="List every timm architecture (timm:NAME), not only those in the Hugging Face cache.")
def models(family, offline, include_timm):
    """List the backbones --model accepts: feature dim, input size, offline weights."""
    from .backbones.catalog import catalog

    entries = catalog(family, offline, include_timm)
    rows = [("name", "family", "dim", "input", "offline weights")]
    rows += [(e.name, e.family, str(e.feature_dim or "?"), str(e.input_size), f"yes: {e.offline}" if e.offline else "no")
             for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                   + "  " + row[4])


@main.command()
@global_flags
@click.argument("data", type=click.Path(file_okay=False))
@backbone_options
@click.option("--epochs", default=3, show_default=True, type=POSITIVE, help="Epochs for every strategy.")
@click.option("--limit", default=None, type=POSITIVE, help="At most N training images (class-balanced, seeded).")
@click.option("--batch-size", default=32, show_default=True, type=POSITIVE)
@click.option("--lr", default=0.01, show_default=True, type=FiniteFloat(0, MAX_LR, min_open=True),
              help=f"SGD learning rate (momentum 0.9, cosine), at most {MAX_LR:g}: beyond that SGD only diverges.")
@click.option("--seed", default=defaults.SEED, show_default=True, type=SEED, help="Seed of --limit, batch order and head init.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Plot accuracy vs time (needs matplotlib; evaluates after every epoch).")
@device_option
@click.pass_obj
def bench(obj, data, limit, json_path, plot_path, **settings):
    """Time fine-tuning vs frozen-online vs cached features on DATA, side by side."""
    from .benchmark import run_benchmark
    from .benchmark_results import BenchSettings, format_benchmark, plot_benchmark

    result = run_benchmark(data, BenchSettings(**settings), limit=limit, track_curve=plot_path is not None,
                           progress=not obj["quiet"])
    click.echo(format_benchmark(result))
    if json_path:
        Path(ensure_parent(json_path)).write_text(json.dumps(result.to_dict(), indent=2))
        click.echo(f"results -> {json_path}")
    if plot_path:
        click.echo(f"plot -> {plot_benchmark(result, ensure_parent(plot_path))}")


@main.command("make-dataset")
@global_flags
@click.argument("name", type=click.Choice(["fashion-mnist", "digits"]))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--train-per-class", default=None, type=POSITIVE)
@click.option("--test-per-class", default=None, type=POSITIVE)
@click.option("--seed", default=defaults.SEED, show_default=True, type=SEED)
def make_dataset(name, out, **sizes):
    """Write a small real dataset as an image folder (train/ and test/), offline."""
    from .datasets import DATASETS

    if Path(out).exists() and any(Path(out).iterdir()):
        click.echo(f"{out} exists and is not empty; leaving it as it is")
        return
    source = DATASETS[name](out, **{k: v for k, v in sizes.items() if v is not None})
    click.echo(f"{name} from {source} -> {out}")


if __name__ == "__main__":
    main()
