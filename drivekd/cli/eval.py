"""drivekd-eval: DriveBench-style evaluation of a driving VLM (thin CLI over drivekd.eval).

    drivekd-eval --model DIR --data FILE --images ROOT --out DIR [...]   generate, score, report
    drivekd-eval score predictions.json [--out DIR] [--judge-url URL ...]  score a predictions file
    drivekd-eval compare RUN_DIR... --out DIR                              side-by-side Table 1

Errors of drivekd (bad data, bad flag, unreachable judge) print one line and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from drivekd.cli.options import image_options
from drivekd.errors import ConfigError, DriveKDError
from drivekd.eval.judge import DEFAULT_KEY_ENV, DRIVEBENCH_TEMPERATURE
from drivekd.images import ImageSettings, pop_flags

_PATH = click.Path(path_type=Path)


class _Group(click.Group):
    """A click group that turns DriveKDError into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DriveKDError as e:
            message = " ".join(str(e).split())
            click.echo(f"drivekd-eval: error: {message}", err=True)
            ctx.exit(2)


def _judge_options(f):
    options = [
        click.option("--judge-url", default=None, help="OpenAI-compatible base URL of the LLM judge (e.g. http://host:8000/v1); no judge when omitted."),
        click.option("--judge-model", default=None, help="Model name the judge endpoint serves (required with --judge-url)."),
        click.option("--judge-key-env", default=DEFAULT_KEY_ENV, show_default=True, help="NAME of the environment variable holding the judge API key (never the key itself)."),
        click.option("--judge-runs", type=int, default=5, show_default=True, help="Gradings per prediction; the report gives mean and sample std over runs."),
        click.option("--judge-temperature", type=float, default=DRIVEBENCH_TEMPERATURE, show_default=True,
                     help="Sampling temperature sent to the judge. The default is DriveBench's: the runs then differ only by the "
                          "endpoint's nondeterminism (std ~0); 1.0 measures the judge's sampling spread."),
        click.option("--judge-workers", type=int, default=4, show_default=True, help="Concurrent judge requests."),
        click.option("--judge-retries", type=int, default=5, show_default=True, help="Retries per grading on connection errors, HTTP 429/5xx, malformed replies."),
        click.option("--judge-retry-delay", type=float, default=1.0, show_default=True, help="First back-off delay in seconds (doubles on every retry)."),
        click.option("--judge-timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for one judge reply before it counts as a failed attempt (and is retried)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _judge_settings(judge_url, judge_model, judge_key_env, judge_runs, judge_temperature, judge_workers, judge_retries, judge_retry_delay,
                    judge_timeout):
    if judge_url is None:
        if judge_model is not None:
            raise ConfigError("--judge-model was given without --judge-url: give the judge endpoint too")
        return None
    from drivekd.eval.judge import JudgeSettings

    if judge_retries < 0 or judge_retry_delay < 0:
        raise ConfigError("--judge-retries and --judge-retry-delay must be >= 0")
    return JudgeSettings(
        url=judge_url, model=judge_model or "", key_env=judge_key_env, runs=judge_runs, temperature=judge_temperature,
        workers=judge_workers, retries=judge_retries, base_delay=judge_retry_delay, timeout=judge_timeout,
    )


def _print_summary(report: dict, out_dir: Path) -> None:
    from drivekd.eval.report import table1_row

    click.echo("| Model | Perception | Reasoning | Planning | Average | Memory (GB) | tok/s | TTFT (s) |")
    click.echo(table1_row(report))
    deploy = report.get("deploy") or {}
    if "max_new_tokens" in deploy:
        click.echo(f"deployment: {deploy['max_new_tokens']} new tokens per generation (fixed), batch {deploy['batch_size']}, "
                   f"median of {deploy['runs']} runs, {deploy['dtype']} on {deploy['device_name']}")
    click.echo(f"unanswerable: {report['unanswerable']['count']}; report: {out_dir / 'report.md'}")


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=_PATH, default=None, help="Checkpoint folder of the model to evaluate.")
@click.option("--data", type=_PATH, default=None, help="DriveBench JSON file (list of records).")
@click.option("--images", type=_PATH, default=None, help="Root folder the records' image paths are relative to.")
@click.option("--allow-outside-images", is_flag=True, help="Accept image paths that escape the image root; refused by default.")
@click.option("--out", "out_dir", type=_PATH, default=None, help="Run folder: predictions.json, report.{json,md,png}, judge.jsonl.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-new-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--deploy/--no-deploy", default=False, show_default=True,
              help="Also measure peak memory, tok/s and TTFT, by a fixed protocol: 32 new tokens per generation whatever "
                   "--max-new-tokens, batch 1, the first sample's prompt, median of 5 runs after a warm-up.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N samples.")
@click.option("--compare", multiple=True, type=_PATH, help="Another run folder to compare with (repeatable).")
@click.option("--name", default=None, help="Model name in the report (default: the training run's name when --model is a "
              "checkpoint of a drivekd run, i.e. the folder above it holds run.json; else the --model folder name).")
@_judge_options
@image_options
@click.pass_context
def main(ctx: click.Context, model_dir, data, images, allow_outside_images, out_dir, batch_size, max_new_tokens, temperature, top_p, deploy, limit, compare, name, **judge_kw):
    """Evaluate a driving VLM on DriveBench, or score / compare existing runs (see the commands)."""
    image_flags = pop_flags(judge_kw)  # --tiling, --max-patches, --min-pixels, --max-pixels
    if ctx.invoked_subcommand is not None:
        if any(v is not None for v in (model_dir, data, images, out_dir, judge_kw["judge_url"])) or compare:
            raise ConfigError(
                f"options before `{ctx.invoked_subcommand}` (--model, --data, --images, --out, --compare, "
                f"--judge-*) apply to generation only; put them after `{ctx.invoked_subcommand}`"
            )
        return
    if model_dir is None and data is None and out_dir is None:
        click.echo(ctx.get_help())
        return
    missing = [flag for flag, v in (("--model", model_dir), ("--data", data), ("--out", out_dir)) if v is None]
    if missing:
        raise ConfigError(f"generation needs {', '.join(missing)} (or use `drivekd-eval score FILE` to score existing predictions)")
    from drivekd.config import load_config
    from drivekd.eval.report import evaluate_model

    report = evaluate_model(
        model_dir, data, out_dir, images=images, batch_size=batch_size, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, deploy=deploy, judge=_judge_settings(**judge_kw), limit=limit,
        compare=compare, model_name=name, image_settings=ImageSettings.from_sources(image_flags, load_config(None)),
        allow_outside_images=allow_outside_images,
    )
    _print_summary(report, out_dir)


@main.command("score")
@click.argument("predictions", type=_PATH)
@click.option("--out", "out_dir", type=_PATH, default=None, help="Report folder (default: the predictions file's folder).")
@click.option("--name", default=None, help="Model name in the report (default: the report folder's name).")
@_judge_options
def score_command(predictions: Path, out_dir: Path | None, name: str | None, **judge_kw):
    """Score a DriveBench-format predictions file (records with "pred") without loading a model."""
    from drivekd.eval.predictions import read_predictions
    from drivekd.eval.report import score_and_report

    from drivekd.eval.score import check_records

    judge = _judge_settings(**judge_kw)  # flags checked before reading anything
    records = read_predictions(predictions)
    check_records(records, str(predictions))  # every malformed record named, before any judge call
    out_dir = out_dir or predictions.parent
    from drivekd.eval.provenance import scoring_provenance

    report = score_and_report(records, out_dir, judge=judge, model_name=name, progress=judge is not None,
                              provenance=scoring_provenance(predictions, judge))
    _print_summary(report, out_dir)


@main.command("compare")
@click.argument("runs", nargs=-1, required=True, type=_PATH)
@click.option("--out", "out_dir", type=_PATH, required=True, help="Folder for comparison.{md,json,png}.")
def compare_command(runs: tuple[Path, ...], out_dir: Path):
    """Put several runs' reports side by side (RUNS: run folders or report.json files)."""
    from drivekd.eval.report import compare_reports

    paths = compare_reports(list(runs), out_dir)
    click.echo(paths["md"].read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
