"""drivekd-ablate: run an ablation file (many drivekd-train runs from one store), evaluate each run,
write one Table-4 comparison report. Parses flags and calls drivekd.ablate.

    drivekd-ablate --config configs/ablations/table4.toml [--project drivekd.toml] [--out DIR]
    drivekd-ablate --config FILE --check          validate every run's settings, train nothing
    drivekd-ablate --config FILE --only ce-perception --only multi-agp
    drivekd-ablate --config FILE --report-only    rewrite the report from what is evaluated

Rerunning the same command resumes: finished runs are skipped, a half-trained run continues from
its latest checkpoint. Errors print one line and exit with status 2; failed runs exit with 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from drivekd.errors import DriveKDError

_PATH = click.Path(path_type=Path)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("--config", "config_path", type=_PATH, required=True, help="Ablation file (TOML: [ablation], [base], [[runs]]).")
@click.option("--project", type=_PATH, default=None, help="Project config with the [train]/[data] defaults (default: [ablation].project, else ./drivekd.toml).")
@click.option("--out", type=_PATH, default=None, help="Ablation folder (default: [ablation].out).")
@click.option("--only", multiple=True, help="Run only this run (repeatable); the report still shows every row.")
@click.option("--check", is_flag=True, help="Validate the file (every run's settings at every seed) and list the jobs; train nothing.")
@click.option("--no-eval", is_flag=True, help="Train only; evaluate later with another call.")
@click.option("--report-only", is_flag=True, help="Only rewrite report.{md,json,png} from the evaluated runs.")
def main(config_path, project, out, only, check, no_eval, report_only) -> None:
    """Train every run of an ablation from one store, evaluate each, write one Table-4 report."""
    from drivekd.ablate import load_ablation, run_ablation, write_ablation_report

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        abl = load_ablation(config_path, out=out, project=project, need_eval=not (no_eval or check))
        if check:
            for r in abl.runs:
                what = f"unavailable: {r.unavailable}" if r.unavailable else f"{len(r.jobs)} job(s), recipe {r.jobs[0].cfg.recipe}"
                click.echo(f"{r.name:<28} row {r.row!r:<28} {what}")
            click.echo(f"{sum(len(r.jobs) for r in abl.runs)} jobs checked -> {abl.out}")
            return
        if report_only:
            write_ablation_report(abl)
            failed = []
        else:
            result = run_ablation(abl, only=only, evaluate=not no_eval)
            failed = result.failed
    except DriveKDError as e:
        click.echo(f"drivekd-ablate: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    md = abl.out / "report.md"
    click.echo(md.read_text(encoding="utf-8") if md.is_file() else "no report written")
    if failed:
        click.echo(f"drivekd-ablate: {len(failed)} job(s) failed: " + "; ".join(f"{o.key}: {o.error}" for o in failed), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
