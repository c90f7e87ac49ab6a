"""A held-out synthetic driving benchmark: train / val / heldout splits, disjoint by scene.

Built on the demo scene generator (`drivekd.demo.scenes`): each scene is one front-camera image
(a straight road, a traffic light, a lead vehicle in the ego lane, other traffic and pedestrians)
and six multiple-choice questions about it, two per capability:

  perception  light_colour   What colour is the traffic light?            (Red / Yellow / Green)
              lead_type      What type is the vehicle ahead in the lane?  (Car / Truck / Bus / Motorcycle)
  reasoning   lead_stop      Will the vehicle ahead stop?                 (Yes / No)       [prediction]
              ego_behaviour  What is the ego vehicle's likely behaviour?  (4 options)      [behavior]
  planning    ego_action     What should the ego vehicle do next?         (4 options)
              stop_line      What should it do at the stop line?          (Stop / Proceed)

Every correct letter is decidable from the pixels: the lit lamp (its colour), the lead vehicle's
shape and its size in the image (distance: closer than 15 m means "follow", else "keep"), and the
scene rules of `scenes.generate_scene` (a non-green light makes the lead brake and the ego stop).
Options are listed in a fixed order per question kind, so a model has to read the image, not
match an option's text against the answer; the `prior` accuracy (always answering the most common
training letter of each kind) is the chance level to beat, reported per split and capability.

Design choices for a tiny model trained on CPU:
* Images are 128x64 (a 2:1 image is cut by the tiny InternVL processor into two 64-px tiles plus a
  thumbnail without rescaling, 48 vision tokens), so the lamp stays a few pixels wide.
* The light is green in half of the scenes and red / yellow in a quarter each, so the yes/no
  questions are balanced (the demo generator draws the three colours uniformly).
* Questions and answers are short ("Final: A. Red"): the byte-level tokenizer spends one token per
  character.

Splits are seeded separately (`drivekd-bench-{seed}-{split}-{i}`), so the train split does not
change when the held-out split grows, and no scene appears in two splits.

`make_benchmark(out, seed, train=..., val=..., heldout=...)` (counts are scenes; 6 questions each)
writes under `out`:
  images/<frame_token>/CAM_FRONT.png
  {split}.json              Drive-KD format (drivekd-cache build / drivekd-train --data)
  {split}_drivebench.json   DriveBench format, answer = letter (drivekd-eval --data)
  scenes.json               scene specs and questions per split (ground truth for tests)
  benchmark.json            counts, priors and the binomial std of the held-out accuracy
CLI: `python -m drivekd.demo.benchmark --out DIR --seed S --train N --val N --heldout N`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from drivekd.demo.scenes import generate_scene, render_view
from drivekd.errors import ConfigError
from drivekd.roles import CAPABILITIES

SPLITS = ("train", "val", "heldout")
# The tiny teacher trained on this benchmark (tools/train_teacher.py), committed with its record.
TEACHER_DIR = Path(__file__).parent / "teacher"
# A tiny student trained on random answer letters: it answers in the template, at chance (make demo's student).
STUDENT_DIR = Path(__file__).parent / "student"
SIZE = (128, 64)
CAMERA = "CAM_FRONT"
# Light colour per scene: green half the time, so "will it stop?" is 50/50.
LIGHT_WEIGHTS = {"red": 0.25, "yellow": 0.25, "green": 0.5}
FOLLOW_GAP_M = 15.0  # scenes.generate_scene: a green-light lead closer than this means "follow"

# kind -> (capability, DriveBench question_type, question, options in fixed order)
QUESTIONS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "light_colour": ("perception", "perception", "What colour is the traffic light ahead?",
                     ("Red", "Yellow", "Green")),
    "lead_type": ("perception", "perception", "What type of vehicle is ahead in the ego lane?",
                  ("Car", "Truck", "Bus", "Motorcycle")),
    "lead_stop": ("reasoning", "prediction", "Will the vehicle ahead in the ego lane stop?",
                  ("Yes, it will stop.", "No, it will keep going.")),
    "ego_behaviour": ("reasoning", "behavior", "What is the ego vehicle's likely behaviour?",
                      ("Decelerating to a stop.", "Slowing down slightly.", "Going at a constant speed.",
                       "Turning left quickly.")),
    "ego_action": ("planning", "planning", "What should the ego vehicle do next?",
                   ("Stop and wait for green.", "Slow down to stop.", "Keep a safe distance.",
                    "Keep the same speed.")),
    "stop_line": ("planning", "planning", "What should the ego vehicle do at the stop line?",
                  ("Stop before it.", "Drive through.")),
}
KINDS = tuple(QUESTIONS)


def correct_option(kind: str, scene: dict[str, Any]) -> int:
    """Index of the correct option of question `kind` for a scene spec (the ground-truth rule)."""
    colour = scene["traffic_light"]["colour"]
    lead = scene["objects"][0]  # generate_scene puts the lead vehicle first
    action = scene["ego_action"]  # stop | prepare_stop | follow | keep
    if kind == "light_colour":
        return ("red", "yellow", "green").index(colour)
    if kind == "lead_type":
        return ("car", "truck", "bus", "motorcycle").index(lead["kind"])
    if kind == "lead_stop":
        return 0 if colour != "green" else 1
    if kind == "ego_behaviour":
        return {"stop": 0, "prepare_stop": 0, "follow": 1, "keep": 2}[action]
    if kind == "ego_action":
        return {"stop": 0, "prepare_stop": 1, "follow": 2, "keep": 3}[action]
    if kind == "stop_line":
        return 0 if colour != "green" else 1
    raise KeyError(kind)


def question_text(kind: str) -> str:
    """The question with its options, one per line: 'Q\\nA. x\\nB. y'."""
    _, _, q, opts = QUESTIONS[kind]
    return q + "\n" + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts))


def answer_text(kind: str, index: int) -> str:
    """The Drive-KD reference answer: 'Final: B. Yellow' (the parser reads the letter after 'Final:')."""
    return f"Final: {'ABCD'[index]}. {QUESTIONS[kind][3][index]}"


def make_scene(seed: int, split: str, i: int) -> dict[str, Any]:
    """Scene i of a split: a single front view with the light colour drawn by LIGHT_WEIGHTS."""
    rng = random.Random(f"drivekd-bench-{seed}-{split}-{i}")
    colour = rng.choices(list(LIGHT_WEIGHTS), weights=list(LIGHT_WEIGHTS.values()))[0]
    scene = generate_scene(rng, six_view=False, light_colour=colour)
    scene["split"] = split
    scene["index"] = i
    scene["scene_token"] = f"{rng.getrandbits(128):032x}"
    scene["frame_token"] = f"{rng.getrandbits(128):032x}"
    return scene


def _binomial_std(n: int, p: float = 0.5) -> float | None:
    """Standard deviation (percentage points) of an accuracy measured on n questions at true rate p."""
    return round(100.0 * math.sqrt(p * (1 - p) / n), 2) if n else None


def make_benchmark(out: str | Path, seed: int = 0, *, train: int = 600, val: int = 100, heldout: int = 300,
                   size: tuple[int, int] = SIZE) -> dict[str, Any]:
    """Write the benchmark under `out` (see the module docstring); returns the summary (benchmark.json).

    train / val / heldout: number of scenes per split (6 questions each; 0 allowed for val/heldout).
    Same seed and counts -> byte-identical files.
    """
    counts = {"train": train, "val": val, "heldout": heldout}
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"--{name} must be a number of scenes >= 0, got {n!r}")
    if train < 1:
        raise ConfigError("--train must be >= 1 scene (the priors are read from the train split)")
    t0 = time.perf_counter()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    drivekd: dict[str, list] = {s: [] for s in SPLITS}
    bench: dict[str, list] = {s: [] for s in SPLITS}
    specs: dict[str, list] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for i in range(counts[split]):
            scene = make_scene(seed, split, i)
            image = f"images/{scene['frame_token']}/{CAMERA}.png"
            (out / image).parent.mkdir(exist_ok=True)
            img, _layout = render_view(scene, CAMERA, size)
            img.save(out / image, format="PNG", optimize=False, compress_level=6)
            scene["questions"] = []
            for kind in KINDS:
                cap, qtype, _, _ = QUESTIONS[kind]
                k = correct_option(kind, scene)
                q = question_text(kind)
                drivekd[split].append({
                    "messages": [{"role": "user", "content": "<image>" + q},
                                 {"role": "assistant", "content": answer_text(kind, k)}],
                    "images": [image],
                    "question_type": cap,
                })
                bench[split].append({
                    "scene_token": scene["scene_token"], "frame_token": scene["frame_token"],
                    "question": q, "answer": "ABCD"[k], "tag": [0], "question_type": qtype,
                    "kind": kind, "image_path": {CAMERA: image},
                })
                scene["questions"].append({"kind": kind, "capability": cap, "letter": "ABCD"[k]})
            specs[split].append(scene)
    for split in SPLITS:
        _write_json(out / f"{split}.json", drivekd[split])
        _write_json(out / f"{split}_drivebench.json", bench[split])
    _write_json(out / "scenes.json", {"seed": seed, "size": list(size), "splits": specs})
    summary = summarize(bench, seed=seed, size=size, scenes=counts)
    summary["out"] = str(out)
    _write_json(out / "benchmark.json", summary)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def format_only_split(records: list[dict], seed: int) -> list[dict]:
    """The Drive-KD records with each answer replaced by a uniformly random option of its question.

    Training on these teaches a model the answer template and the options of every question, but
    nothing about the images (the letters carry no information): a "pretrained" student that
    answers in the format, at chance, like a real pretrained VLM that has not seen driving data.
    """
    rng = random.Random(f"drivekd-bench-format-{seed}")
    by_question = {question_text(k): k for k in KINDS}
    out = []
    for r in records:
        kind = by_question[r["messages"][0]["content"].replace("<image>", "")]
        r = json.loads(json.dumps(r))
        r["messages"][1]["content"] = answer_text(kind, rng.randrange(len(QUESTIONS[kind][3])))
        out.append(r)
    return out


def prior_letters(train_records: list[dict]) -> dict[str, str]:
    """The most common answer letter per question kind in the train split (ties: the first letter)."""
    by_kind: dict[str, Counter] = {}
    for r in train_records:
        by_kind.setdefault(r["kind"], Counter())[r["answer"]] += 1
    return {k: min(c, key=lambda letter: (-c[letter], letter)) for k, c in by_kind.items()}


def summarize(bench: dict[str, list], *, seed: int, size: tuple[int, int], scenes: dict[str, int]) -> dict[str, Any]:
    """Counts per split and capability, prior (chance) accuracy, and the binomial std of held-out accuracy."""
    prior = prior_letters(bench["train"])
    caps: dict[str, Any] = {}
    for split in SPLITS:
        recs = bench[split]
        row = {}
        for cap in CAPABILITIES:
            rs = [r for r in recs if QUESTIONS[r["kind"]][0] == cap]
            hit = sum(r["answer"] == prior.get(r["kind"]) for r in rs)
            row[cap] = {"questions": len(rs), "prior_accuracy": round(100.0 * hit / len(rs), 2) if rs else None}
        caps[split] = row
    n_held = {cap: caps["heldout"][cap]["questions"] for cap in CAPABILITIES}
    return {
        "seed": seed,
        "size": list(size),
        "scenes": dict(scenes),
        "questions": {s: len(bench[s]) for s in SPLITS},
        "per_capability": caps,
        "prior_letter": prior,
        # Worst case (p = 0.5) binomial std of an accuracy on the held-out split, in points.
        "heldout_binomial_std": {**{c: _binomial_std(n) for c, n in n_held.items()},
                                 "all": _binomial_std(sum(n_held.values()))},
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def summary_line(s: dict[str, Any]) -> str:
    q, std = s["questions"], s["heldout_binomial_std"]
    prior = {c: s["per_capability"]["heldout"][c]["prior_accuracy"] for c in CAPABILITIES}
    return (f"benchmark (seed {s['seed']}) -> {s['out']}: questions train {q['train']}, val {q['val']}, heldout "
            f"{q['heldout']} (scenes x6); held-out prior accuracy {prior}; held-out binomial std (p=0.5) {std} points")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write into.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed and counts -> byte-identical files.")
@click.option("--train", default=600, show_default=True, type=click.IntRange(min=1), help="Train scenes (6 questions each).")
@click.option("--val", default=100, show_default=True, type=click.IntRange(min=0), help="Validation scenes (for tuning).")
@click.option("--heldout", default=300, show_default=True, type=click.IntRange(min=0),
              help="Held-out scenes (final numbers only; never tune on them).")
def main(out: Path, seed: int, train: int, val: int, heldout: int) -> None:
    """Write the synthetic driving benchmark (train / val / heldout, disjoint by scene)."""
    click.echo(summary_line(make_benchmark(out, seed, train=train, val=val, heldout=heldout)))


if __name__ == "__main__":
    main()
