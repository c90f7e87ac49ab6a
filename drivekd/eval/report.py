"""Evaluation reports: report.json, report.md (the paper's Table 1 layout) and a bar chart.

`score_and_report` is the whole no-model pipeline (judge -> scores -> files) that both CLI paths
call; `compare_reports` puts several runs side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from drivekd.errors import ConfigError, DataError
from drivekd.eval.predictions import atomic_write_text
from drivekd.eval.score import CAPABILITIES, score_predictions
from drivekd.plots import bar_png

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
JUDGE_LOG = "judge.jsonl"

_TABLE1_HEADER = "| Model | Perception | Reasoning | Planning | Average | Memory (GB) | tok/s | TTFT (s) |"
_TABLE1_RULE = "|---|---:|---:|---:|---:|---:|---:|---:|"
_DEFINITIONS = {
    "mcq_accuracy": "multiple-choice accuracy (%); capabilities without multiple-choice questions "
    "(DriveBench planning) need judge grades (--judge-url) and show n/a",
    "judge_mean": "mean LLM-judge grade (0-100) over all graded questions of the capability "
    "(DriveBench GPT score)",
}


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _deploy_cells(deploy: Mapping[str, Any] | None) -> list[str]:
    deploy = deploy or {}
    return [
        _fmt(deploy.get("peak_memory_gb"), 1) if deploy.get("peak_memory_gb") is not None else "-",
        _fmt(deploy.get("tokens_per_s"), 1) if deploy.get("tokens_per_s") is not None else "-",
        _fmt(deploy.get("ttft_s"), 2) if deploy.get("ttft_s") is not None else "-",
    ]


def table1_row(report: Mapping[str, Any]) -> str:
    """One markdown row in the Table 1 layout."""
    t = report["table1"]
    cells = [str(report.get("model", "model"))] + [_fmt(t[c]) for c in CAPABILITIES] + [_fmt(t["average"])]
    return "| " + " | ".join(cells + _deploy_cells(report.get("deploy"))) + " |"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The markdown text of report.md."""
    lines = [f"# DriveBench evaluation: {report.get('model', 'model')}", ""]
    lines += [f"{report['n_records']} questions. Capability score: {_DEFINITIONS[report['score_definition']]}.", ""]
    lines += [_TABLE1_HEADER, _TABLE1_RULE, table1_row(report), ""]

    lines += ["## Per capability", "", "| Capability | Questions | MCQ | MCQ correct | MCQ accuracy (%) | Unanswerable | Score |", "|---|---:|---:|---:|---:|---:|---:|"]
    for cap in CAPABILITIES:
        c = report["capabilities"][cap]
        lines.append(f"| {cap} | {c['n_questions']} | {c['mcq_total']} | {c['mcq_correct']} | {_fmt(c['mcq_accuracy'])} | {c['unanswerable']} | {_fmt(c['score'])} |")
    lines.append("")

    lines += ["## Per question type", "", "| Question type | Capability | Questions | MCQ | MCQ accuracy (%) | Unanswerable | Judge mean |", "|---|---|---:|---:|---:|---:|---:|"]
    for qtype, q in report["question_types"].items():
        judge = q.get("judge") or {}
        lines.append(f"| {qtype} | {q['capability']} | {q['n_questions']} | {q['mcq_total']} | {_fmt(q['mcq_accuracy'])} | {q['unanswerable']} | {_fmt(judge.get('mean'))} |")
    lines.append("")

    un = report["unanswerable"]
    n_mcq = sum(report["capabilities"][c]["mcq_total"] for c in CAPABILITIES)
    lines += ["## Unanswerable predictions", ""]
    lines.append(f"{un['count']} of {n_mcq} multiple-choice predictions state no readable option (counted as wrong).")
    if un["ids"]:
        shown = ", ".join(un["ids"][:20]) + (f", ... ({len(un['ids']) - 20} more in report.json)" if len(un["ids"]) > 20 else "")
        lines.append(f"Ids: {shown}")
    lines.append("")

    lines += ["## Judge", ""]
    judge = report.get("judge")
    if judge:
        lines += [f"{judge['runs']} grading runs; mean ± sample std (ddof=1) over runs of the per-run capability mean.", ""]
        lines += ["| Capability | Mean ± std | Graded |", "|---|---:|---:|"]
        for cap in CAPABILITIES:
            j = judge["per_capability"].get(cap)
            cell = "n/a" if j is None else f"{_fmt(j['mean'])} ± {_fmt(j['std'])}"
            graded = report["capabilities"][cap].get("judge_coverage", "0")
            lines.append(f"| {cap} | {cell} | {graded} |")
    else:
        lines.append("No judge grades (pass --judge-url to grade with an LLM judge).")
    lines.append("")

    cons = report["consistency"]
    lines += ["## Reasoning-planning consistency", ""]
    lines.append(f"Pearson r = {_fmt(cons['pearson'], 3)}, Spearman rho = {_fmt(cons['spearman'], 3)}, n = {cons['n_groups']} image groups")
    lines.append(f"(per image: mean reasoning score vs mean planning score; score = {cons['score']}; n/a below 3 groups or with zero variance).")
    lines += _deploy_lines(report.get("deploy"))
    lines += _provenance_lines(report.get("provenance"))
    return "\n".join(lines) + "\n"


def _deploy_lines(deploy: Mapping[str, Any] | None) -> list[str]:
    if not deploy or "max_new_tokens" not in deploy:
        return []
    return ["", "## Deployment", "",
            f"Protocol: {deploy['max_new_tokens']} new tokens per generation (fixed, whatever --max-new-tokens), batch "
            f"{deploy.get('batch_size')}, prompt of {deploy.get('prompt_tokens')} tokens, median over {deploy.get('runs')} runs "
            f"after one warm-up; {deploy.get('dtype')} on {deploy.get('device_name')}; memory: {deploy.get('memory_kind')}."]


def _provenance_lines(p: Mapping[str, Any] | None) -> list[str]:
    if not p:
        return []
    lines = ["", "## Provenance", ""]
    if p.get("model"):
        m = p["model"]
        lines.append(f"- model: `{m['path']}` (sha256 of its files {m['fingerprint'][:16]}…)" + (f", run {m['run']}" if m.get("run") else ""))
    if p.get("data"):
        d = p["data"]
        lines.append(f"- data: `{d['path']}` (sha256 {d['sha256'][:16]}…), {d['samples']} samples" + (f" (--limit {d['limit']})" if d.get("limit") else ""))
    if p.get("predictions"):
        fmt = f", {p['predictions']['format']} layout" if p["predictions"].get("format") else ""
        lines.append(f"- predictions: `{p['predictions']['path']}` (sha256 {p['predictions']['sha256'][:16]}…{fmt})")
    if p.get("reference"):
        lines.append(f"- reference answers: `{p['reference']['path']}` (sha256 {p['reference']['sha256'][:16]}…)")
    if p.get("images"):
        lines.append(f"- images: root `{p['images']['root']}`, settings {p['images']['settings'] or 'the checkpoint’s own'}")
    if p.get("generation"):
        lines.append("- generation: " + ", ".join(f"{k} {v}" for k, v in p["generation"].items()))
    j = p.get("judge")
    lines.append("- judge: " + (f"{j['model']} at {j['url']}, {j['runs']} runs, temperature {j['temperature']}" if j else "none"))
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()))
    return lines


def _values(report: Mapping[str, Any]) -> list[float | None]:
    t = report["table1"]
    return [t[c] for c in CAPABILITIES] + [t["average"]]


def _errors(report: Mapping[str, Any]) -> list[float | None]:
    """Judge std over runs per capability (None without a judge); the average gets none."""
    judge = (report.get("judge") or {}).get("per_capability") or {}
    return [(judge.get(c) or {}).get("std") for c in CAPABILITIES] + [None]


def write_report(
    out_dir: str | Path,
    report_dict: Mapping[str, Any],
    deploy: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and report.png into `out_dir`; returns their paths.

    `deploy` (peak_memory_gb, tokens_per_s, ttft_s) fills the Table 1 deployment columns;
    `provenance` (drivekd.eval.provenance) says what was evaluated, how, and with which versions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(report_dict)
    report["model"] = model_name or report.get("model") or out_dir.resolve().name
    if deploy is not None:
        report["deploy"] = dict(deploy)
    report.setdefault("deploy", None)
    if provenance is not None:
        report["provenance"] = dict(provenance)
    paths = {
        "json": atomic_write_text(out_dir / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
        "md": atomic_write_text(out_dir / REPORT_MD, report_markdown(report)),
    }
    what = "MCQ accuracy" if report["score_definition"] == "mcq_accuracy" else "judge score (error bars: std over runs)"
    paths["png"] = bar_png(out_dir / REPORT_PNG, [report["model"]], [_values(report)], f"{report['model']}: DriveBench {what}", [_errors(report)])
    return paths


def load_report(path_or_dir: str | Path) -> dict[str, Any]:
    """A report.json, given the file or the run folder holding it."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise DataError(f"no report at {path}: run `drivekd-eval score` (or an evaluation) for that run first")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        report["table1"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not a drivekd report.json") from None
    report.setdefault("model", path.parent.name)
    return report


def compare_reports(paths_or_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Side-by-side Table 1 of several runs: comparison.md, comparison.json, comparison.png in `out`."""
    if not paths_or_dirs:
        raise DataError("nothing to compare: give one or more run folders (or report.json files)")
    reports = [load_report(p) for p in paths_or_dirs]
    names: list[str] = []
    for rep, src in zip(reports, paths_or_dirs):
        name = str(rep["model"])
        if name in names:  # two runs of the same model: tell them apart by folder
            name = f"{name} ({Path(src).resolve().name})"
        names.append(name)
        rep["model"] = name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    definitions = sorted({r["score_definition"] for r in reports})
    lines = ["# DriveBench comparison", ""]
    if len(definitions) > 1:
        lines += ["Warning: the runs use different capability scores (" + ", ".join(definitions) + "); rows are not comparable.", ""]
    lines += [f"Capability score: {_DEFINITIONS[d]}." for d in definitions] + [""]
    lines += [_TABLE1_HEADER, _TABLE1_RULE] + [table1_row(r) for r in reports] + [""]
    lines += ["| Model | Unanswerable | Pearson | Spearman | n groups |", "|---|---:|---:|---:|---:|"]
    for r in reports:
        c = r["consistency"]
        lines.append(f"| {r['model']} | {r['unanswerable']['count']} | {_fmt(c['pearson'], 3)} | {_fmt(c['spearman'], 3)} | {c['n_groups']} |")
    rows = [
        {"model": r["model"], "source": str(src), **r["table1"], "deploy": r.get("deploy"), "score_definition": r["score_definition"]}
        for r, src in zip(reports, paths_or_dirs)
    ]
    paths = {
        "json": atomic_write_text(out / "comparison.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n"),
        "md": atomic_write_text(out / "comparison.md", "\n".join(lines) + "\n"),
    }
    paths["png"] = bar_png(out / "comparison.png", names, [_values(r) for r in reports], "DriveBench comparison", [_errors(r) for r in reports])
    return paths


def score_and_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    judge: Any = None,
    deploy: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    progress: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Grade (when `judge`, a `drivekd.eval.judge.JudgeSettings`, is given), score and write the report.

    The judge's raw answers go to `out_dir/judge.jsonl`, which also lets an interrupted grading
    resume. Returns the report dict as written to report.json.
    """
    out_dir = Path(out_dir)
    score_predictions(records)  # validate every record before spending any judge call
    grades = None
    if judge is not None:
        from drivekd.eval.judge import grade_records

        grades = grade_records(
            records, judge.client(), runs=judge.runs, log_path=out_dir / JUDGE_LOG, workers=judge.workers, progress=progress
        )
    report = score_predictions(records, grades)
    paths = write_report(out_dir, report, deploy=deploy, model_name=model_name, provenance=provenance)
    return json.loads(paths["json"].read_text(encoding="utf-8"))


def evaluate_model(
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    images: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    deploy: bool = False,
    judge: Any = None,
    limit: int | None = None,
    compare: Sequence[str | Path] = (),
    model_name: str | None = None,
    image_settings: Any = None,
    allow_outside_images: bool = False,
    format: str = "drivebench",
    language: bool = True,
) -> dict[str, Any]:
    """Generation-based evaluation: load samples, generate (resumable), measure, score, report.

    Every option is checked before any model loads. Generation comes from
    `drivekd.eval.generate` (imported here, so scoring works without it). `format` (drivebench,
    drivelm, robosense) also writes the predictions in that challenge's submission layout
    (`drivekd.eval.formats`) and scores them as that challenge does (challenge.json / .md); the
    judge then grades with that challenge's prompts only; `language` False skips the challenge's
    language metrics (Java), reported as missing.
    """
    from drivekd.eval.formats import check_format

    check_format(format)
    from drivekd.errors import ConfigError

    model_dir, data, out_dir = Path(model_dir), Path(data), Path(out_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir} is not a folder: give a saved student/teacher checkpoint folder")
    if not data.is_file():
        raise ConfigError(f"--data {data} does not exist: give a DriveBench (or Drive-KD) JSON file")
    if images is not None and not Path(images).is_dir():
        raise ConfigError(f"--images {images} is not a folder: give the root the image paths are relative to")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is an existing file; the evaluation writes a folder: give another path")
    checks = [
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {max_new_tokens}"),
        (temperature >= 0, f"--temperature must be >= 0, got {temperature}"),
        (0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
        (limit is None or limit >= 1, f"--limit must be >= 1, got {limit}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for run in compare:  # fail now, not after hours of generation
        load_report(run)

    try:
        from drivekd.data.loaders import load_samples
    except ImportError as e:
        raise ConfigError(f"the data loader (drivekd.data.loaders) is not available in this install: {e}") from None
    all_samples = load_samples(data, images_root=images, allow_outside_images=allow_outside_images)
    samples = all_samples[:limit] if limit is not None else all_samples
    if format != "drivebench":  # before any model loads: can these samples be written and scored that way?
        from drivekd.eval.formats import check_exportable

        check_exportable(format, all_samples, f"--data {data}")
    if not samples:
        raise DataError(f"--data {data} holds no samples")
    try:
        from drivekd.eval.generate import generate_predictions, measure_deploy
    except ImportError as e:
        raise ConfigError(
            f"model generation (drivekd.eval.generate) is not available: {e}; "
            "to score an existing predictions file use `drivekd-eval score FILE`"
        ) from None

    out_dir.mkdir(parents=True, exist_ok=True)
    records = generate_predictions(model_dir, samples, out_dir, batch_size, max_new_tokens, temperature, top_p, progress=True,
                                   image_settings=image_settings)
    pred_path = out_dir / "predictions.json"
    if not pred_path.exists():
        from drivekd.eval.predictions import write_predictions

        write_predictions(pred_path, records)
    from drivekd.eval import provenance as prov

    deploy_metrics = None
    if deploy:
        deploy_metrics = measure_deploy(model_dir, samples, image_settings=image_settings, max_new_tokens=prov.DEPLOY_NEW_TOKENS,
                                        runs=prov.DEPLOY_RUNS, batch_size=prov.DEPLOY_BATCH)
    generation = {"max_new_tokens": max_new_tokens, "decoding": "sampling" if temperature > 0 else "greedy",
                  "temperature": temperature, "top_p": top_p, "batch_size": batch_size}
    provenance = prov.evaluation_provenance(model_dir, data, Path(images) if images is not None else None, limit=limit,
                                            n_samples=len(samples), generation=generation, image_settings=image_settings,
                                            judge=judge, deploy=deploy)
    name = model_name or prov.default_model_name(model_dir)
    if format == "drivebench":
        report = score_and_report(records, out_dir, judge=judge, deploy=deploy_metrics, model_name=name, progress=True,
                                  provenance=provenance)
    else:
        from drivekd.eval.formats import export_predictions

        exported = export_predictions(format, all_samples, {s.id: r["pred"] for s, r in zip(samples, records)}, out_dir)
        score_submission(exported, out_dir, fmt=format, judge=judge, model_name=name, progress=True, provenance=provenance,
                         samples=all_samples, missing="skip" if limit is not None else "error", language=language)
        report = json.loads((out_dir / REPORT_JSON).read_text(encoding="utf-8"))
        if deploy_metrics is not None:  # the DriveBench-style report carries Table 1's deployment columns
            write_report(out_dir, report, deploy=deploy_metrics, model_name=name, provenance=provenance)
            report = json.loads((out_dir / REPORT_JSON).read_text(encoding="utf-8"))
        from drivekd.eval.challenge import CHALLENGE_JSON

        report["challenge"] = json.loads((out_dir / CHALLENGE_JSON).read_text(encoding="utf-8"))
    if compare:
        compare_reports([out_dir, *compare], out_dir / "compare")
    return report


def _judge_grader(judge, out_dir: Path, progress: bool):
    """The DriveLM challenge's grader through drivekd's judge client (mean over --judge-runs per question)."""
    from drivekd.eval.challenge import drivelm_judge_messages, mean_grades, parse_number_grade
    from drivekd.eval.judge import grade_prompts

    def grade(items):
        prompts = [(cid, "drivelm", drivelm_judge_messages(pred, ref)) for cid, pred, ref, _ in items]
        return mean_grades(grade_prompts(prompts, judge.client(), runs=judge.runs, log_path=out_dir / "judge.jsonl",
                                         workers=judge.workers, progress=progress, parse=parse_number_grade,
                                         expect="a number from 0 to 100"))
    return grade


def score_submission(
    path: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "auto",
    data: str | Path | None = None,
    judge: Any = None,
    model_name: str | None = None,
    language: bool = True,
    missing: str = "error",
    progress: bool = False,
    provenance: Mapping[str, Any] | None = None,
    samples: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Score a predictions file in any format; returns report.json's dict (with `challenge` for
    DriveLM / RoboSense). `samples` (already loaded reference samples) spares re-reading `data`."""
    from drivekd.eval.formats import load_reference, prediction_record, read_submission

    path, out_dir = Path(path), Path(out_dir)
    fmt, entries = read_submission(path, fmt)
    if fmt == "drivebench":
        return score_and_report(entries, out_dir, judge=judge, model_name=model_name, progress=progress, provenance=provenance)
    if samples is None:
        if data is None:
            raise ConfigError(f"{path} is a {fmt} submission, which holds no reference answers: pass --data with the "
                              "reference file (the DriveLM QA file with tags, or the RoboSense file with answers)")
        samples = load_reference(data)
    from drivekd.eval import challenge as ch

    if fmt == "drivelm":
        questions = ch.drivelm_questions(samples)
        if not any(q.tags for q in questions):
            raise DataError(f"--data {data}: no question has a DriveLM `tag`; the DriveLM scores need the tagged "
                            "DriveLM QA file (a RoboSense file has no tags)")
        answers = {e["id"]: e["answer"] for e in entries}
        grader = _judge_grader(judge, out_dir, progress) if judge is not None else None
        result = ch.score_drivelm(questions, answers, grader, language=language, missing=missing, where=str(path))
        by_cid = {q.challenge_id: q for q in questions}
        by_sid = {s.id: s for s in samples}
        records = [prediction_record(by_sid[by_cid[cid].sample_id], a) for cid, a in answers.items()]
    else:
        from drivekd.eval.formats import join_robosense

        records = join_robosense(path, entries, samples)
        grades = None
        if judge is not None:
            from drivekd.eval.judge import grade_records

            vqa = [r for r in records if ch.robosense_kind(r["question"], r["answer"]) != "MCQ"]
            grades = ch.mean_grades(grade_records(vqa, judge.client(), runs=judge.runs, log_path=out_dir / "judge.jsonl",
                                                  workers=judge.workers, progress=progress)) if vqa else {}
        result = ch.score_robosense(records, grades, language=language)
    result["submission"] = str(path)
    report = score_and_report(records, out_dir, judge=None, model_name=model_name, provenance=provenance)
    ch.write_challenge(out_dir, result, report.get("model"))
    report["challenge"] = result
    return report


