"""drivekd-report: plots and a markdown summary of training runs, from their metrics.jsonl.

    drivekd-report RUN [RUN...] [--out DIR]       (also: python -m drivekd.cli.report ...)

A separate command rather than a `drivekd-train report` subcommand: drivekd-train's options are
derived one-to-one from TrainConfig, and turning it into a click group would make `drivekd-train
--out x` ambiguous with a subcommand. See drivekd/trainer/runs_report.py for what is drawn.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from drivekd.errors import DriveKDError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNGs and summary.md  [default: RUN/report for one run, ./report for several]")
def main(runs: tuple[Path, ...], out: Path | None) -> None:
    """Plot loss curves, loss weights, gradient conflict (cos with CE, AGP projections), lr and
    throughput of one or more drivekd-train runs, overlaid."""
    from drivekd.trainer.runs_report import write_report

    if out is None:
        out = runs[0] / "report" if len(runs) == 1 else Path("report")
    try:
        files = write_report(runs, out)
    except DriveKDError as e:
        click.echo(f"drivekd-report: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    click.echo(f"drivekd-report: {len(runs)} run(s) -> " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
