"""`make analyze-demo`: the pre-studies on the tiny demo teacher and the synthetic demo scenes.

Uses (or makes) the same checkpoints and data as `make demo` (DEMO/models, DEMO/data), adds a
rewording of the first question of every image group (marked `rewording_of`, see
drivekd.analyze.sampling), then runs the real `drivekd-analyze` into DEMO/analysis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from drivekd.analyze.sampling import REWORDING_FIELD


def reword(question: str) -> str:
    """A fixed paraphrase frame: the question's meaning stays, its tokens change."""
    return f"Looking at the camera views, {question[:1].lower()}{question[1:]}"


def add_rewordings(train: Path, out: Path) -> int:
    """Write `out`: the records of `train` plus one rewording of the first question of each image
    group. Returns the number of rewordings."""
    from drivekd.data.loaders import load_samples

    records = json.loads(train.read_text())
    samples = load_samples(train, check_images=False)  # same order as the records: their ids
    seen, extra = set(), []
    for rec, s in zip(records, samples):
        if s.group_key in seen:
            continue
        seen.add(s.group_key)
        r = json.loads(json.dumps(rec))
        r["messages"][0]["content"] = "<image>" * len(s.images) + reword(s.question)
        r["id"], r[REWORDING_FIELD] = f"{s.id}-rw", s.id
        extra.append(r)
    out.write_text(json.dumps(records + extra, indent=1) + "\n")
    return len(extra)


@click.command()
@click.option("--demo", type=click.Path(path_type=Path), default=Path("demo"), help="Demo folder (models/, data/ as `make demo`).")
@click.option("--family", type=click.Choice(["internvl", "qwen2_5_vl"]), default="internvl")
def main(demo: Path, family: str) -> None:
    from drivekd.demo.scenes import make_demo_data
    from drivekd.demo.tiny_models import make_tiny_models

    demo = demo.resolve()
    if not (demo / "models" / "tiny-models.json").is_file():
        make_tiny_models(demo / "models")
    data = demo / "data"
    if not (data / "train.json").is_file():
        make_demo_data(data, groups=6, questions_per_group=4, seed=42)  # the `make demo` data set
    n = add_rewordings(data / "train.json", data / "train-rewordings.json")
    click.echo(f"{n} rewordings added -> {data / 'train-rewordings.json'}")
    cmd = [sys.executable, "-m", "drivekd.cli.analyze", "--model", str(demo / "models" / f"{family}-teacher"),
           "--data", str(data / "train-rewordings.json"), "--images", str(data), "--out", str(demo / "analysis")]
    click.echo("$ " + " ".join(cmd[1:]).replace("-m drivekd.cli.analyze", "drivekd-analyze"))
    p = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
