"""The ablation's one comparison report: report.{json,md,png} in the layout of the paper's Table 4.

Rows: the file's `row` labels in order of first appearance; a row may gather several runs, each
filling the capabilities it reports (the paper's single-teacher protocol: CE on the perception
split reports perception only, and so on). Columns: the capability scores drivekd-eval reports
(perception, reasoning, planning; `capabilities[c].score`: MCQ accuracy, or the judge mean when the
runs were graded) and their average per seed; a second table splits them by DriveBench question
type (perception, prediction, behavior, planning). Each cell: mean ± sample std (ddof=1) over the
seeds evaluated so far, a bare mean with one seed. Cells a row's runs do not report show "-".

`table4` is a pure function of the eval reports (tested on its own); `write_ablation_report` reads
them from eval/NAME/seed-S/report.json and the job states from state/.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

from drivekd.ablate.config import Ablation
from drivekd.ablate.state import read_state
from drivekd.eval.score import capability_of
from drivekd.roles import CAPABILITIES

COLUMNS = (*CAPABILITIES, "average")
QUESTION_TYPES = ("perception", "prediction", "behavior", "planning")
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "std" (sample, ddof=1; None below 2 values), "n", "values"}."""
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def _qtype_score(report: Mapping[str, Any], qtype: str) -> float | None:
    q = report.get("question_types", {}).get(qtype)
    if q is None:
        return None
    if report.get("score_definition") == "judge_mean":
        return (q.get("judge") or {}).get("mean")
    return q.get("mcq_accuracy")


def _cell(per_seed: Mapping[Any, float | None], status: str | None) -> dict[str, Any]:
    """One table cell from {seed: score}: n/a when any evaluated seed has no score (e.g. open
    questions without a judge), else mean ± std over the seeds."""
    values = list(per_seed.values())
    if status is not None:
        return {"mean": None, "std": None, "n": 0, "values": [], "status": status}
    if any(v is None for v in values):
        return {"mean": None, "std": None, "n": len(values), "values": values, "status": "n/a"}
    return {**mean_std(values), "seeds": list(per_seed), "status": None if values else "pending"}


def table4(rows: Sequence[str], runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows.

    runs: one dict per run, in file order: {"name", "row", "report" (capabilities), "status":
    None | "unavailable: ..." | "failed: ...", "reports": {seed: eval report dict}}.
    """
    out = []
    for row in rows:
        members = [r for r in runs if r["row"] == row]
        source = {c: r for r in members for c in r["report"]}
        cells: dict[str, Any] = {}
        per_seed_caps: dict[str, dict[Any, float | None]] = {}
        for c in CAPABILITIES:
            r = source.get(c)
            if r is None:
                cells[c] = {"mean": None, "std": None, "n": 0, "values": [], "status": "-"}
                continue
            per_seed_caps[c] = {s: rep["capabilities"][c]["score"] for s, rep in r["reports"].items()}
            cells[c] = _cell(per_seed_caps[c], _unavailable(r))
            cells[c]["run"] = r["name"]
        # Average per seed over the three capabilities (each possibly from another run of the row).
        if all(c in per_seed_caps and cells[c]["status"] is None for c in CAPABILITIES):
            seeds = [s for s in per_seed_caps[CAPABILITIES[0]] if all(s in per_seed_caps[c] for c in CAPABILITIES)]
            cells["average"] = _cell({s: sum(per_seed_caps[c][s] for c in CAPABILITIES) / 3 for s in seeds}, None)
        else:
            cells["average"] = {"mean": None, "std": None, "n": 0, "values": [], "status": "-"}
        qtypes = {}
        for q in QUESTION_TYPES:
            r = source.get(capability_of(q))
            if r is None:
                qtypes[q] = {"mean": None, "std": None, "n": 0, "values": [], "status": "-"}
                continue
            qtypes[q] = _cell({s: _qtype_score(rep, q) for s, rep in r["reports"].items()}, _unavailable(r))
        by_status: dict[str, list[str]] = {}
        for r in members:
            if r.get("status"):
                by_status.setdefault(r["status"], []).append(r["name"])
        notes = [f"{', '.join(names)}: {status}" for status, names in by_status.items()]
        out.append({"row": row, "runs": [r["name"] for r in members], "cells": cells, "question_types": qtypes,
                    "notes": notes})
    return out


def _unavailable(run: Mapping[str, Any]) -> str | None:
    status = run.get("status")
    if status and status.startswith("unavailable"):
        return "unavailable"
    if status and status.startswith("failed") and not run["reports"]:
        return "failed"
    return None


def fmt_cell(cell: Mapping[str, Any], digits: int = 2) -> str:
    if cell.get("status"):
        return cell["status"]
    if cell["std"] is None:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# {report['title']}", ""]
    seeds = report["seeds"]
    lines.append(f"{len(report['runs'])} runs x {len(seeds) if seeds else 1} seed(s){f' ({seeds})' if seeds else ''}; "
                 f"evaluated on {report['eval_data']}. Score: {report['score_definition']}. Each cell: mean ± sample std "
                 "(ddof=1) over seeds; '-': the row's runs do not report that capability.")
    lines += ["", "| Setting | Perception | Reasoning | Planning | Average | Notes |", "|---|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        cells = [fmt_cell(r["cells"][c]) for c in COLUMNS]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {'; '.join(r['notes'])} |")
    lines += ["", "## Per question type", "", "| Setting | Perception | Prediction | Behavior | Planning |",
              "|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['row']} | " + " | ".join(fmt_cell(r["question_types"][q]) for q in QUESTION_TYPES) + " |")
    lines += ["", "## Runs", "", "| Run | Row | Reports | Status | Seeds evaluated | Train calls | Train (s) | Eval (s) |",
              "|---|---|---|---|---:|---|---:|---:|"]
    for run in report["runs"]:
        calls = ", ".join(f"{s}: {n}" for s, n in run["train_calls"].items()) or "-"
        lines.append(f"| {run['name']} | {run['row']} | {', '.join(run['report'])} | {run['status'] or 'done'} | "
                     f"{len(run['evaluated_seeds'])} | {calls} | {run['train_seconds']:.1f} | {run['eval_seconds']:.1f} |")
    lines += ["", f"Wall time of all jobs (training + evaluation, summed over calls): {report['wall_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def collect(abl: Ablation) -> list[dict[str, Any]]:
    """Each run's status, job states and eval reports, as `table4` takes them."""
    runs = []
    for spec in abl.runs:
        run: dict[str, Any] = {"name": spec.name, "row": spec.row, "report": list(spec.report), "reports": {},
                               "train_calls": {}, "train_seconds": 0.0, "eval_seconds": 0.0, "status": None}
        if spec.unavailable:
            run["status"] = f"unavailable: {spec.unavailable}"
        errors, pending = [], 0
        for job in spec.jobs:
            state = read_state(abl.state_path(job))
            seed = job.seed if job.seed is not None else "-"
            run["train_calls"][str(seed)] = state.get("train_calls", 0)
            run["train_seconds"] += state.get("train_seconds", 0.0)
            run["eval_seconds"] += state.get("eval_seconds", 0.0)
            path = abl.eval_dir(job) / "report.json"
            if state.get("status") == "done" and path.is_file():
                run["reports"][str(seed)] = json.loads(path.read_text(encoding="utf-8"))
            elif state.get("status") == "failed":
                errors.append(f"seed {seed}: {state.get('error')}")
            else:
                pending += 1
        if errors:
            run["status"] = "failed (" + "; ".join(errors) + ")"
        elif pending and not spec.unavailable:
            run["status"] = f"pending: {pending} of {len(spec.jobs)} job(s) not evaluated yet"
        runs.append(run)
    return runs


def write_ablation_report(abl: Ablation) -> dict[str, Any]:
    """report.json, report.md and report.png in the ablation's folder; returns the report dict."""
    from drivekd.eval.predictions import atomic_write_text
    from drivekd.plots import bar_png

    runs = collect(abl)
    definitions = {rep.get("score_definition") for r in runs for rep in r["reports"].values()}
    report = {
        "title": abl.title,
        "config": str(abl.path),
        "seeds": abl.seeds,
        "eval_data": str(abl.eval_data),
        "score_definition": " / ".join(sorted(d for d in definitions if d)) or "none evaluated yet",
        "rows": table4(abl.rows, runs),
        "runs": [{**{k: v for k, v in r.items() if k != "reports"}, "evaluated_seeds": list(r["reports"])} for r in runs],
        "wall_seconds": sum(r["train_seconds"] + r["eval_seconds"] for r in runs),
    }
    abl.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(abl.out / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(abl.out / REPORT_MD, markdown(report))
    shown = [r for r in report["rows"] if any(r["cells"][c]["mean"] is not None for c in COLUMNS)]
    if shown:
        bar_png(abl.out / REPORT_PNG, [r["row"] for r in shown], [[r["cells"][c]["mean"] for c in COLUMNS] for r in shown],
                 f"{abl.title} (mean over seeds; error bars: std)", [[r["cells"][c]["std"] for c in COLUMNS] for r in shown])
    return report


__all__ = ["COLUMNS", "QUESTION_TYPES", "collect", "fmt_cell", "markdown", "mean_std", "table4", "write_ablation_report"]
