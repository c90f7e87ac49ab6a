"""drivekd-train: parse flags, build a TrainConfig, call drivekd.trainer.train.

    drivekd-train --cache cache/ --student DIR --data FILE --images ROOT --out runs/NAME [--recipe multi] ...

Every flag can also be set in the [train] table of drivekd.toml (--config, default ./drivekd.toml
when present) with underscores for dashes; flags given on the command line win.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from drivekd.errors import DriveKDError

P = click.Path(path_type=Path)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("--config", "config_path", type=P, help="Project config (TOML, [train] table); default ./drivekd.toml if present.")
@click.option("--cache", type=P, help="Teacher store built by drivekd-cache.")
@click.option("--student", type=P, help="Student checkpoint folder.")
@click.option("--data", type=P, help="Training data JSON (Drive-KD or DriveBench format).")
@click.option("--images", type=P, help="Image root for relative paths (default: the data file's folder).")
@click.option("--out", type=P, help="Run folder (metrics.jsonl, step-NNNNNN/, final/).")
@click.option("--recipe", type=click.Choice(["perception", "reasoning", "planning", "multi"]), help="Single-teacher recipe or multi (default).")
@click.option("--signal", type=click.Choice(["t2v", "full"]), help="Ablation: attention signal of every teacher term.")
@click.option("--loss", type=click.Choice(["mse", "cosine"]), help="Attention loss (default mse).")
@click.option("--layers", help="Layers, e.g. 0, L-2, 1..L-3; several terms: 'perception=0;planning=L-2'.")
@click.option("--mid-range", help="Reasoning range variant, e.g. mid2 (indices 1..L-3).")
@click.option("--full-reduction", type=click.Choice(["paper", "reference"]), help="Full-map MSE: paper eq. 11 (default) or mean over T x T.")
@click.option("--text-tokens", type=click.Choice(["paper", "not_vision"]), help="Text query set X (must match the store).")
@click.option("--mix", help="3x3 mixing matrix, rows ';' columns ',' (default 0.8,0.1,0.1;0.1,0.8,0.1;0.1,0.1,0.8).")
@click.option("--w-ce", type=float, help="Static CE weight (default 1).")
@click.option("--w-perception", type=float, help="Static perception-term weight (default 1; 0 switches it off).")
@click.option("--w-reasoning", type=float, help="Static reasoning-term weight (default 1).")
@click.option("--w-planning", type=float, help="Static planning-term weight (default 1).")
@click.option("--projection", type=click.Choice(["agp", "g1", "g2", "none"]), help="Gradient-conflict handling (default agp).")
@click.option("--dynamic-weights/--no-dynamic-weights", default=None, help="Online loss re-weighting (default on).")
@click.option("--reweight-alpha", type=float, help="Re-weighting alpha (default 0).")
@click.option("--reweight-lr", type=float, help="Re-weighting AdamW lr (default 3e-4).")
@click.option("--lr", type=float, help="Peak learning rate (default 5e-5).")
@click.option("--epochs", type=int, help="Epochs (default 3).")
@click.option("--micro-batch", type=int, help="Samples per forward per process (default 1).")
@click.option("--grad-accum", type=int, help="Micro-steps per optimizer step (default 4).")
@click.option("--warmup-ratio", type=float, help="Warmup share of steps (default 0.03).")
@click.option("--min-lr-ratio", type=float, help="Cosine floor / lr (default 0.01).")
@click.option("--weight-decay", type=float, help="AdamW weight decay (default 0).")
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm (default 1; 0 = off).")
@click.option("--seed", type=int, help="Seed (default 42).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Autocast dtype (auto: bf16 on GPU).")
@click.option("--grad-buffer-dtype", type=click.Choice(["float32", "bfloat16"]), help="dtype of the per-loss gradient rows.")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Recompute activations in backward.")
@click.option("--max-steps", type=int, help="Stop after N optimizer steps (overrides --epochs).")
@click.option("--num-workers", type=int, help="DataLoader workers (default 2).")
@click.option("--save-every", type=int, help="Checkpoint every N steps (default 500; 0 = final only).")
@click.option("--keep-last", type=int, help="Step checkpoints to keep (default 2).")
@click.option("--resume", is_flag=True, default=None, help="Continue from the latest complete checkpoint in --out.")
@click.option("--resume-from", type=P, help="Continue from this checkpoint folder.")
@click.option("--skip-nonfinite", is_flag=True, default=None, help="Skip samples with a NaN/inf loss instead of stopping.")
@click.option("--log-every", type=int, help="Metrics line every N steps (default 1).")
@click.option("--progress/--no-progress", default=None, help="tqdm progress bar (default on).")
@click.option("--dry-run", is_flag=True, help="Plan only: peak GPU memory by category and FLOPs of one step, from config.json alone (no GPU, no weights).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print one JSON object.")
@click.option("--gpu-memory", help="With --dry-run: the GPU's memory, e.g. 40GiB, 80GB; the verdict says whether the run fits.")
@click.option("--seq-len", type=int, help="With --dry-run: tokens per sample (default: the cameras' image tokens + 264).")
@click.option("--cameras", type=int, default=6, show_default=True, help="With --dry-run: images per sample.")
@click.pass_context
def main(ctx: click.Context, config_path, dry_run, as_json, gpu_memory, seq_len, cameras, **flags) -> None:
    """Distil a driving VLM student from stored teacher attention (Drive-KD)."""
    from drivekd.trainer.config import config_from_sources
    from drivekd.trainer.loop import train

    given = {k: v for k, v in flags.items() if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    if dry_run:
        _dry_run(given, config_path, as_json, gpu_memory, seq_len, cameras)
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


def _dry_run(given, config_path, as_json, gpu_memory, seq_len, cameras) -> None:
    import json

    from drivekd.planner import dry_run, format_report, parse_bytes
    from drivekd.trainer.config import config_from_sources

    try:
        cfg = config_from_sources(given, config_path)
        report = dry_run(cfg, seq_len=seq_len, cameras=cameras, gpu_memory=parse_bytes(gpu_memory))
    except DriveKDError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    main()
