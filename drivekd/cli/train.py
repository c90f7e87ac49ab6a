"""drivekd-train: parse flags, build a TrainConfig, call drivekd.trainer.train.

    drivekd-train --cache cache/ --student DIR --data FILE --images ROOT --out runs/NAME [--recipe multi] ...

Every option is derived from a `TrainConfig` field (drivekd/trainer/settings.py: its default, help
and choices are written there once). Each can also be set in the [train] table of drivekd.toml
(--config, default ./drivekd.toml when present) with underscores for dashes; flags given on the
command line win.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

from drivekd.cli.options import image_options
from drivekd.errors import DriveKDError
from drivekd.trainer.settings import GROUPS, TrainConfig, flag, kind


def _option(f) -> click.Option:
    """The click option of one settings field; the default stays in TrainConfig (None here means
    'not given', so drivekd.toml can set it)."""
    meta, t = f.metadata, kind(f)
    help_ = meta["help"]
    if f.default is not None and not meta.get("required"):
        help_ += f"  [default: {str(f.default).lower() if t is bool else f.default}]"
    name, aliases = flag(f.name), list(meta.get("aliases", ()))
    if t is bool:
        if aliases:  # a --x/--no-x pair would need a negative spelling of each alias too
            raise TypeError(f"settings field {f.name}: aliases are for value options, not switches")
        if f.name in ("resume", "skip_nonfinite"):  # plain switches: off unless given
            return click.Option([name, f.name], is_flag=True, default=None, show_default=False, help=help_)
        return click.Option([f"{name}/--no-{name[2:]}", f.name], default=None, show_default=False, help=help_)
    ctype = (click.Choice(meta["choices"]) if meta.get("choices") else
             {Path: click.Path(path_type=Path), int: int, float: float, str: str}[t])
    return click.Option([name, *aliases, f.name], type=ctype, default=None, show_default=False, help=help_)


class _GroupedHelp(click.Command):
    """--help lists the options by concern, in TrainConfig's order."""

    def format_options(self, ctx, formatter):
        by_name = {p.name: p for p in self.get_params(ctx)}
        group_of = {f.name: f.metadata["group"] for f in fields(TrainConfig)}
        for group in (*GROUPS, None):
            rows = [by_name[n].get_help_record(ctx) for n in by_name if group_of.get(n) == group]
            rows = [r for r in rows if r]
            if rows:
                with formatter.section(f"{group.capitalize()} options" if group else "Other options"):
                    formatter.write_dl(rows)


def _with_settings(cmd):
    for f in reversed(fields(TrainConfig)):
        if f.metadata.get("cli", True):
            cmd.params.insert(0, _option(f))
    return cmd


@_with_settings
@click.command(cls=_GroupedHelp, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="Project config (TOML, [train] table); default ./drivekd.toml if present.")
@image_options
@click.option("--dry-run", is_flag=True, help="Plan only: peak GPU memory by category and FLOPs of one step, from config.json alone (no GPU, no weights).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print one JSON object.")
@click.option("--gpu-memory", help="With --dry-run: the GPU's memory, e.g. 40GiB, 80GB; the verdict says whether the run fits.")
@click.option("--seq-len", type=int, help="With --dry-run: tokens per sample (default: the cameras' image tokens + 264).")
@click.option("--cameras", type=int, default=6, show_default=True, help="With --dry-run: images per sample.")
@click.option("--nproc", type=int, default=1, show_default=True, help="With --dry-run --fsdp: ranks the student is sharded over (per-rank peak).")
@click.pass_context
def main(ctx: click.Context, config_path, dry_run, as_json, gpu_memory, seq_len, cameras, nproc, **flags) -> None:
    """Distil a driving VLM student from stored teacher attention (Drive-KD)."""
    from drivekd.trainer.loop import train
    from drivekd.trainer.settings import config_from_sources

    given = {k: v for k, v in flags.items() if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    if dry_run:
        _dry_run(given, config_path, as_json, gpu_memory, seq_len, cameras, nproc)
        return
    try:
        cfg = config_from_sources(given, config_path)
        result = train(cfg)
    except DriveKDError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if result.plan.world == 1 or _rank() == 0:
        last = result.metrics[-1] if result.metrics else {}
        loss = f", last loss {last['loss']:.4g}" if last.get("loss") is not None else ""
        click.echo(f"drivekd-train: {result.steps} steps{loss} -> {result.final}")


def _dry_run(given, config_path, as_json, gpu_memory, seq_len, cameras, nproc=1) -> None:
    import json

    from drivekd.planner import dry_run, format_report, parse_bytes
    from drivekd.trainer.settings import config_from_sources

    try:
        cfg = config_from_sources(given, config_path)
        report = dry_run(cfg, seq_len=seq_len, cameras=cameras, gpu_memory=parse_bytes(gpu_memory), nproc=nproc)
    except DriveKDError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    main()
