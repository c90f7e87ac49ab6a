"""drivekd-eval: DriveBench-style evaluation of a driving VLM (thin CLI over drivekd.eval).

    drivekd-eval --model DIR --data FILE --images ROOT --out DIR [--format F]  generate, export, score, report
    drivekd-eval score FILE [--data REF] [--format F] [--out DIR] [--judge-url URL ...]  score a predictions file
    drivekd-eval compare RUN_DIR... --out DIR                              side-by-side Table 1

Errors of drivekd (bad data, bad flag, unreachable judge) print one line and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from drivekd.cli.options import image_options
from drivekd.errors import ConfigError, DriveKDError
from drivekd.eval.challenge import DRIVELM_JUDGE_TEMPERATURE
from drivekd.eval.formats import FORMATS
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
        click.option("--judge-temperature", type=float, default=None,
                     help=f"Sampling temperature sent to the judge. Default: the challenge's own, DriveBench's {DRIVEBENCH_TEMPERATURE} "
                          f"(also for RoboSense), DriveLM's {DRIVELM_JUDGE_TEMPERATURE}. At DriveBench's the runs differ only by the "
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
                    judge_timeout, fmt: str = "drivebench"):
    if judge_url is None:
        if judge_model is not None:
            raise ConfigError("--judge-model was given without --judge-url: give the judge endpoint too")
        return None
    from drivekd.eval.judge import JudgeSettings

    if judge_retries < 0 or judge_retry_delay < 0:
        raise ConfigError("--judge-retries and --judge-retry-delay must be >= 0")
    return JudgeSettings(
        url=judge_url, model=judge_model or "", key_env=judge_key_env, runs=judge_runs,
        temperature=judge_temperature if judge_temperature is not None else (DRIVELM_JUDGE_TEMPERATURE if fmt == "drivelm" else DRIVEBENCH_TEMPERATURE),
        workers=judge_workers, retries=judge_retries, base_delay=judge_retry_delay, timeout=judge_timeout,
    )


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _print_summary(report: dict, out_dir: Path) -> None:
    from drivekd.eval.report import table1_row

    click.echo("| Model | Perception | Reasoning | Planning | Average | Memory (GB) | tok/s | TTFT (s) |")
    click.echo(table1_row(report))
    deploy = report.get("deploy") or {}
    if "max_new_tokens" in deploy:
        click.echo(f"deployment: {deploy['max_new_tokens']} new tokens per generation (fixed), batch {deploy['batch_size']}, "
                   f"median of {deploy['runs']} runs, {deploy['dtype']} on {deploy['device_name']}")
    click.echo(f"unanswerable: {report['unanswerable']['count']}; report: {out_dir / 'report.md'}")
    challenge = report.get("challenge")
    if challenge:
        from drivekd.eval.challenge import CHALLENGE_MD

        if challenge["challenge"] == "drivelm":
            head = f"DriveLM final {_num(challenge['final'])} (accuracy {_num(challenge['accuracy']['value'])}, chatgpt " \
                   f"{_num(challenge['chatgpt']['value'])}, language {_num(challenge['language']['score'])}, match {_num(challenge['match']['value'])})"
        else:
            head = f"RoboSense phase 1 {_num(challenge['phase1'])}, phase 2 {_num(challenge['phase2'])} (MCQ accuracy " \
                   f"{_num(challenge['mcq_accuracy'])}, VQA LLM score {_num(challenge['vqa_llm_score'])})"
        click.echo(f"{head}; {out_dir / CHALLENGE_MD}")
        for item in challenge["missing"]:
            click.echo(f"  partial: missing {item}")


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=_PATH, default=None, help="Checkpoint folder of the model to evaluate.")
@click.option("--data", type=_PATH, default=None, help="Data file: DriveBench, Drive-KD, DriveLM or RoboSense JSON (detected from its shape).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="drivebench", show_default=True,
              help="Also write the predictions in this challenge's submission layout (drivelm: output.json, robosense: "
                   "results.json) and score them as it does (challenge.json / challenge.md).")
@click.option("--language/--no-language", default=True, show_default=True,
              help="With --format drivelm / robosense: compute the challenge's language metrics (BLEU, ROUGE-L, CIDEr, "
                   "METEOR; Java). --no-language reports them as missing.")
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
def main(ctx: click.Context, model_dir, data, fmt, language, images, allow_outside_images, out_dir, batch_size, max_new_tokens, temperature, top_p, deploy, limit, compare, name, **judge_kw):
    """Evaluate a driving VLM on DriveBench, or score / compare existing runs (see the commands)."""
    image_flags = pop_flags(judge_kw)  # --tiling, --max-patches, --min-pixels, --max-pixels
    if ctx.invoked_subcommand is not None:
        if any(v is not None for v in (model_dir, data, images, out_dir, judge_kw["judge_url"])) or compare or fmt != "drivebench":
            raise ConfigError(
                f"options before `{ctx.invoked_subcommand}` (--model, --data, --format, --images, --out, --compare, "
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
        temperature=temperature, top_p=top_p, deploy=deploy, judge=_judge_settings(**judge_kw, fmt=fmt), limit=limit,
        compare=compare, model_name=name, image_settings=ImageSettings.from_sources(image_flags, load_config(None)),
        allow_outside_images=allow_outside_images, format=fmt, language=language,
    )
    _print_summary(report, out_dir)


@main.command("score")
@click.argument("predictions", type=_PATH)
@click.option("--format", "fmt", type=click.Choice(("auto", *FORMATS)), default="auto", show_default=True,
              help="Layout of PREDICTIONS: drivebench (records with \"pred\"), drivelm (output.json or submission.json), "
                   "robosense (results.json); auto detects it from the file's shape.")
@click.option("--data", type=_PATH, default=None,
              help="Reference file for a drivelm / robosense submission (which holds no reference answers): the DriveLM "
                   "QA file with tags, or a RoboSense / DriveLM file with answers.")
@click.option("--out", "out_dir", type=_PATH, default=None, help="Report folder (default: the predictions file's folder).")
@click.option("--name", default=None, help="Model name in the report (default: the report folder's name).")
@click.option("--language/--no-language", default=True, show_default=True,
              help="Compute the language metrics (BLEU, ROUGE-L, CIDEr, METEOR; Java). --no-language reports them as missing.")
@_judge_options
def score_command(predictions: Path, fmt: str, data: Path | None, out_dir: Path | None, name: str | None, language: bool, **judge_kw):
    """Score a predictions file (DriveBench, DriveLM or RoboSense layout) without loading a model."""
    from drivekd.eval.formats import read_submission
    from drivekd.eval.report import score_submission
    from drivekd.eval.provenance import scoring_provenance

    fmt, _ = read_submission(predictions, fmt)  # the layout and every record checked before any judge call
    judge = _judge_settings(**judge_kw, fmt=fmt)
    if fmt != "drivebench" and data is None:
        raise ConfigError(f"{predictions} is a {fmt} submission, which holds no reference answers: pass --data with the "
                          "reference file (the DriveLM QA file with tags, or the RoboSense file with answers)")
    out_dir = out_dir or predictions.parent
    report = score_submission(predictions, out_dir, fmt=fmt, data=data, judge=judge, model_name=name, language=language,
                              progress=judge is not None, provenance=scoring_provenance(predictions, judge, data=data if fmt != "drivebench" else None, fmt=fmt))
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
