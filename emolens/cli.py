"""The ``emolens`` command: a thin layer over the Python API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .data import load_dataset
from .images import ImageLoadError, load_image
from .models import model_entries

app = typer.Typer(help="Visual emotion analysis: predict, train, evaluate, index and search.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
datasets_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

console = Console()
err_console = Console(stderr=True)

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 3, 2


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(EXIT_ERROR)


def report_bad_files(errors: list[ImageLoadError]) -> None:
    if not errors:
        return
    table = Table(title=f"{len(errors)} file(s) could not be used", title_style="bold yellow")
    table.add_column("path", overflow="fold")
    table.add_column("reason", overflow="fold")
    for e in errors:
        table.add_row(e.path, e.reason)
    err_console.print(table)


@app.command("list-models")
def list_models_cmd() -> None:
    """List the registered models."""
    table = Table(title="emolens models")
    table.add_column("name", style="bold")
    table.add_column("what it is")
    table.add_column("paper")
    for entry in model_entries():
        table.add_row(entry.name, entry.summary, entry.paper)
    console.print(table)


@datasets_app.command("info")
def datasets_info(
    spec: str = typer.Argument(..., help="KIND=ROOT[:option=value,...], e.g. flickr_ldl=../shared/data/flickr_ldl"),
    check_images: bool = typer.Option(False, "--check-images", help="Open every image and report the unreadable ones."),
) -> None:
    """Counts per class, missing files, distribution summary and polarity balance of a dataset."""
    try:
        ds = load_dataset(spec)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(str(e))
    tax = ds.taxonomy
    counts = ds.class_counts()
    n = len(ds)
    console.print(f"[bold]{ds.kind}[/] at {ds.root}: {n} images, taxonomy [bold]{tax.name}[/] ({tax.num_classes} classes)")
    if ds.missing:
        console.print(f"[yellow]{len(ds.missing)} listed image(s) are missing on disk and were skipped[/] (e.g. {', '.join(ds.missing[:3])})")
    for reason, count in sorted(ds.skipped.items()):
        console.print(f"[yellow]{count} entr(y/ies) skipped: {reason}[/]")
    if ds.ties:
        console.print(f"{ds.ties} sample(s) had a tied dominant emotion (given to the class listed first)")

    table = Table(title="classes (dominant emotion)")
    for col in ("class", "polarity", "images", "share"):
        table.add_column(col, justify="right" if col in ("images", "share") else "left")
    mean_dist = ds.distributions.mean(0) if ds.has_distribution else None
    if mean_dist is not None:
        table.add_column("mean distribution", justify="right")
    for i, cls in enumerate(tax.classes):
        pol = {1: "positive", 0: "negative", None: "-"}[tax.polarity[i]]
        row = [cls, pol, str(counts[cls]), f"{counts[cls] / max(n, 1):.3f}"]
        if mean_dist is not None:
            row.append(f"{mean_dist[i]:.3f}")
        table.add_row(*row)
    console.print(table)

    pol = ds.polarities
    console.print(f"polarity: {(pol == 1).sum()} positive, {(pol == 0).sum()} negative, {(pol < 0).sum()} without polarity")
    if ds.has_distribution:
        d = ds.distributions
        entropy = -(np.where(d > 0, d * np.log(np.maximum(d, 1e-12)), 0)).sum(1)
        console.print(f"distributions: mean dominant share {d.max(1).mean():.3f}, mean entropy {entropy.mean():.3f} nats "
                      f"(uniform: {np.log(tax.num_classes):.3f})")
    if ds.official_split:
        console.print("official split: " + ", ".join(f"{k} {len(v)}" for k, v in ds.official_split.items()))
    if check_images:
        errors = []
        with Progress(console=err_console, transient=True) as progress:
            for s in progress.track(ds.samples, description="checking images"):
                try:
                    load_image(s.path)
                except ImageLoadError as e:
                    errors.append(e)
        report_bad_files(errors)
        console.print(f"images checked: {n - len(errors)} readable, {len(errors)} unreadable")
        if errors:
            raise typer.Exit(EXIT_SOME_FAILED)


def main() -> None:
    app()
