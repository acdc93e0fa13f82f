"""`dcp-image`: build DCP guest images."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from images.builder import BuildConfig, Builder, default_cache_dir, source_checkout
from images.errors import ImageError


class RichReporter:
    """Shows each long step with a spinner and its elapsed time."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A spinner while the step runs, a check mark and the time when it ends."""
        t0 = time.monotonic()
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            progress.add_task(title, total=None)
            yield
        self.console.print(f"[green]✓[/] {title} [dim]({time.monotonic() - t0:.1f} s)[/]")

    def note(self, message: str) -> None:
        """Print the remark."""
        self.console.print(f"[cyan]•[/] {message}")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log each step.")
def main(verbose: bool) -> None:
    """Build DCP guest images (qcow2 base, kernel, initrd, Vagrant box)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory to put the image files in (default: only the cache).",
)
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    default=None,
    help="Kernel to boot (default: the newest /boot/vmlinuz-*).",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Image cache (default: ~/.cache/dcp/images).",
)
@click.option(
    "--source",
    "source_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="DCP checkout whose packages go into the guest (default: this one).",
)
@click.option("--suite", default="bookworm", show_default=True, help="Debian suite.")
@click.option("--force", is_flag=True, help="Rebuild even if the inputs are unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build(
    out_dir: Path | None,
    kernel: Path | None,
    cache_dir: Path | None,
    source_dir: Path | None,
    suite: str,
    force: bool,
    as_json: bool,
) -> None:
    """Build the guest image, or reuse the cached one if its inputs are unchanged."""
    console = Console(stderr=True)
    config = BuildConfig(
        source_dir=(source_dir or source_checkout()).resolve(),
        cache_dir=cache_dir or default_cache_dir(),
        out_dir=out_dir,
        kernel=kernel,
        suite=suite,
        force=force,
    )
    try:
        image = Builder(config, RichReporter(console)).build()
    except ImageError as exc:
        raise click.ClickException(str(exc)) from exc
    result = {
        "directory": str(image.directory),
        "base": str(image.base),
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "box": str(image.box),
        "cached": image.cached,
        "content_sha256": image.manifest["content_sha256"],
        "build_seconds": image.manifest["build_seconds"],
    }
    if as_json:
        click.echo(json.dumps(result))
    else:
        state = "cached" if image.cached else "built"
        click.echo(f"{state}: {image.directory} (content sha256 {result['content_sha256']})")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def manifest(directory: Path) -> None:
    """Print an image's manifest."""
    path = directory / "manifest.json"
    if not path.is_file():
        raise click.ClickException(f"{directory} has no manifest.json")
    click.echo(path.read_text())


if __name__ == "__main__":
    main()
