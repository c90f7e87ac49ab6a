"""drivekd-analyze: the paper's pre-studies on any supported checkpoint. Parses flags and calls
drivekd.analyze.

    drivekd-analyze --model DIR --data FILE --images ROOT --out DIR [--samples N] [--per-image Q]
    torchrun --nproc_per_node=8 -m drivekd.cli.analyze ...        # sharded by image group
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from drivekd.analyze.settings import DEFAULT_TEMPERATURES
from drivekd.errors import DriveKDError


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="Checkpoint folder to analyse (a teacher or a student of a supported family).")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Drive-KD or DriveBench JSON. Mark a rewording of a question with \"rewording_of\": \"<its sample id>\".")
@click.option("--images", type=click.Path(path_type=Path), help="Image root for relative paths (default: the data file's folder).")
@click.option("--allow-outside-images", is_flag=True, help="Accept image paths that escape the image root; refused by default.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: analysis.json, one PNG per analysis, samples/ (per-sample results; a rerun resumes).")
@click.option("--samples", type=int, default=200, show_default=True,
              help="Questions to analyse (rewordings of them come on top); 0 = every question.")
@click.option("--per-image", type=int, default=8, show_default=True, help="At most this many questions per image group.")
@click.option("--temperatures", default=",".join(f"{t:g}" for t in DEFAULT_TEMPERATURES), show_default=True,
              help="Temperatures of the output-confidence analysis, comma-separated.")
@click.option("--seed", type=int, default=0, show_default=True, help="Order in which image groups are drawn.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Model dtype (default bfloat16 on GPU, float32 on CPU).")
@click.option("--overwrite", is_flag=True, help="Discard partial results in --out left by another model, data or settings.")
@click.option("--no-progress", is_flag=True)
def main(model_dir, data, images, allow_outside_images, out, samples, per_image, temperatures, seed, device, dtype, overwrite, no_progress):
    """Adjacent-layer and vision-text similarity, capability intra-consistency, dispersion across
    questions of one image, and output confidence, per layer; then a suggested [train] layer
    configuration with the rule that produced it."""
    import torch

    from drivekd.analyze import AnalyzeConfig, analyze
    from drivekd.analyze.settings import parse_temperatures

    try:
        if samples is not None and samples < 0:
            raise DriveKDError(f"--samples must be >= 0 (0 = every question), not {samples}")
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = AnalyzeConfig(
            model=model_dir, data=data, images=images, allow_outside_images=allow_outside_images, out=out, samples=samples or None, per_image=per_image,
            temperatures=parse_temperatures(temperatures), seed=seed, device=dev,
            dtype=dtype or ("bfloat16" if dev.startswith("cuda") else "float32"), overwrite=overwrite,
            progress=not no_progress,
        )
        res = analyze(cfg)
    except DriveKDError as e:
        _fail(e)
    if res["rank"] != 0:
        return
    sug = res["suggestion"]
    click.echo(f"drivekd-analyze: {res['questions']} questions ({res['rewordings']} rewordings) about {res['images']} images; "
               f"{res['computed']} computed, {res['already']} already done, {res['seconds']:.1f} s -> {res['out']}")
    click.echo("figures: " + ", ".join(res["figures"].values()))
    click.echo(f"suggested layers ({sug['signal']} signal):")
    click.echo(sug["train_toml"].rstrip())
    for n in sug["notes"]:
        click.echo(f"  note: {n}")
    click.echo(f"rule: {sug['rule']}")


if __name__ == "__main__":
    main()
