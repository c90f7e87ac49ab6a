"""DriveBench-style scores for a list of prediction records (no model needed).

Input: DriveBench records (dicts with `question_type`, `question`, `answer`, `tag`, `frame_token`,
`image_path`, ...) each with the model's `pred`; optionally judge grades `{record_id: [grade per
run, ...]}` from `drivekd.eval.judge`.

Definitions used in the report:

* **Capability** of a record: DriveBench `question_type` perception -> perception; prediction and
  behavior -> reasoning; planning -> planning (`capability_of`).
* **Multiple-choice** record: `tag` contains 0, or the reference answer is a single letter. The
  letter is read with `drivekd.eval.parse.extract_choice`; a prediction the parser cannot read is
  *unanswerable*: counted as wrong in the accuracy and listed by id, never dropped. Tag-0 records
  whose reference is Yes/No are scored as a two-way choice (`extract_yes_no`).
* **Capability score** (the Table 1 number): without judge grades, the multiple-choice accuracy
  (%) of that capability (None when it has no multiple-choice question, e.g. DriveBench planning,
  which is all open-ended). With judge grades, DriveBench's GPT score: the mean judge grade
  (0-100) over every graded question of the capability, MCQ and open alike; `judge_coverage`
  reports how many of its questions were graded.
* **Average**: mean of the three capability scores (the paper's Table 1 "Average"); None when any
  of the three is None.
* **Judge mean/std** per capability: for each run the mean grade over the capability's questions,
  then the mean and sample standard deviation (ddof=1) of those run means (std None for one run).
* **Reasoning-planning consistency**: per image group (`frame_token`, else the tuple of image
  paths) the mean score of its reasoning questions and of its planning questions, where a
  question's score is its mean judge grade when graded, else its MCQ correctness (0 or 100);
  open questions without a grade are left out. Pearson and Spearman (average ranks for ties)
  across the groups that have both; None with fewer than 3 such groups or zero variance.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from drivekd.data.loaders import strip_image_tags
from drivekd.errors import DataError
from drivekd.ids import content_hash, drivebench_id, explicit_id
from drivekd.roles import CAPABILITIES
from drivekd.eval.parse import extract_choice, extract_yes_no, options_in_question


# DriveBench question_type (and the capability names themselves) -> capability.
_CAPABILITY_OF = {
    "perception": "perception",
    "prediction": "reasoning",
    "behavior": "reasoning",
    "behaviour": "reasoning",
    "reasoning": "reasoning",
    "planning": "planning",
}


def capability_of(question_type: str) -> str:
    """Map a DriveBench question_type to a capability (perception / reasoning / planning)."""
    key = str(question_type).strip().lower()
    try:
        return _CAPABILITY_OF[key]
    except KeyError:
        raise DataError(
            f"unknown question_type {question_type!r}: expected one of {sorted(_CAPABILITY_OF)}"
        ) from None


def record_id(rec: Mapping[str, Any]) -> str:
    """The id of a DriveBench(-like) record: the same id `drivekd.data.load_samples` gives the
    sample, so predictions, the teacher store and the training run name a record alike
    (`drivekd.ids`): its "id" if present, else frame_token + a hash of the question."""
    if rec.get("id") not in (None, ""):
        return explicit_id(rec["id"])
    question = strip_image_tags(str(rec.get("question", "")))
    if rec.get("frame_token"):
        return drivebench_id(str(rec["frame_token"]), question)
    return "rec-" + content_hash([question, str(rec.get("image_path", rec.get("images", "")))])[:16]


def group_key(rec: Mapping[str, Any]) -> str | None:
    """The image group of a record: its frame_token, else its image paths joined; None if neither."""
    if rec.get("frame_token"):
        return str(rec["frame_token"])
    images = rec.get("image_path", rec.get("images"))
    if isinstance(images, Mapping):
        images = list(images.values())
    if isinstance(images, str):
        images = [images]
    if images:
        return "|".join(str(p) for p in images)
    return None


def tags_of(rec: Mapping[str, Any]) -> list[int]:
    """The DriveBench tag(s) of a record as a list of ints (0 MCQ, 1 planning, 2 perception, 3 prediction open)."""
    tag = rec.get("tag")
    if tag is None:
        return []
    try:
        return [int(t) for t in tag] if isinstance(tag, (list, tuple)) else [int(tag)]
    except (TypeError, ValueError):
        raise DataError(f"record {record_id(rec)}: 'tag' must be an int or a list of ints, got {tag!r}") from None


def _single_letter(answer: Any) -> bool:
    return isinstance(answer, str) and re.fullmatch(r"\s*\(?[A-Za-z]\)?\.?\s*", answer) is not None


def is_mcq(rec: Mapping[str, Any]) -> bool:
    """Multiple choice: tag 0, or a reference answer that is a single letter."""
    return 0 in tags_of(rec) or _single_letter(rec.get("answer"))


def mcq_reference(rec: Mapping[str, Any]) -> tuple[str | None, str, str]:
    """(reference choice, how to read the prediction: "letter" | "yesno", the options the parser
    accepts) of a multiple-choice record. The reference is None when it is neither a letter nor
    Yes/No (`check_records` refuses such a tag-0 record as malformed)."""
    answer = str(rec.get("answer", ""))
    options = options_in_question(str(rec.get("question", "")))
    if _single_letter(answer):
        ref = answer.strip(" \t\r\n().").upper()
        return ref, "letter", options + ("" if ref in options else ref)
    ref = extract_choice(answer, options)
    if ref is not None:
        return ref, "letter", options
    return extract_yes_no(answer), "yesno", options


def mcq_outcome(rec: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(predicted choice, reference choice) of a multiple-choice record."""
    ref, kind, options = mcq_reference(rec)
    if ref is None:
        return None, None
    pred = extract_choice(rec.get("pred"), options) if kind == "letter" else extract_yes_no(rec.get("pred"))
    return pred, ref


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or zero variance."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return None
    return float(dx @ dy) / denom


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman correlation: Pearson on average ranks."""
    if len(x) < 3:
        return None
    return pearson(average_ranks(x), average_ranks(y))


def _run_stats(run_means: list[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(run_means)),
        "std": float(np.std(run_means, ddof=1)) if len(run_means) > 1 else None,
        "run_means": [float(v) for v in run_means],
    }


def _judge_stats(ids: list[str], grades: Mapping[str, Sequence[float | None]]) -> dict[str, Any] | None:
    """Mean/std over runs of the per-run mean grade of these records."""
    n_runs = max((len(grades.get(rid, ())) for rid in ids), default=0)
    run_means = []
    for r in range(n_runs):
        vals = [g[r] for rid in ids if r < len(g := grades.get(rid, ())) and g[r] is not None]
        if vals:
            run_means.append(float(np.mean(vals)))
    if not run_means:
        return None
    graded = sum(1 for rid in ids if any(v is not None for v in grades.get(rid, ())))
    return {**_run_stats(run_means), "n_graded": graded, "n_questions": len(ids)}


def _record_grade(grades: Mapping[str, Sequence[float | None]] | None, rid: str) -> float | None:
    if not grades:
        return None
    vals = [float(v) for v in grades.get(rid, ()) if v is not None]
    return float(np.mean(vals)) if vals else None


def consistency(items: Iterable[tuple[str | None, str, float | None]]) -> dict[str, Any]:
    """Reasoning-planning consistency from (group, capability, score) triples (score None = skip)."""
    per_group: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for group, cap, score in items:
        if group is None or score is None:
            continue
        per_group[group][cap].append(score)
    groups = sorted(g for g, caps in per_group.items() if caps.get("reasoning") and caps.get("planning"))
    reasoning = [float(np.mean(per_group[g]["reasoning"])) for g in groups]
    planning = [float(np.mean(per_group[g]["planning"])) for g in groups]
    return {
        "pearson": pearson(reasoning, planning),
        "spearman": spearman(reasoning, planning),
        "n_groups": len(groups),
        "groups": [
            {"group": g, "reasoning": r, "planning": p} for g, r, p in zip(groups, reasoning, planning)
        ],
    }


def record_problems(i: int, rec: Any) -> list[str]:
    """What is wrong with one prediction record (empty when it can be scored)."""
    if not isinstance(rec, Mapping):
        return [f"record {i} is a {type(rec).__name__}, expected a JSON object"]
    rid = record_id(rec)
    out = []
    for key in ("pred", "answer", "question_type"):
        if key not in rec:
            out.append(f"record {i} (id {rid}) has no '{key}' field")
        elif not isinstance(rec[key], str):
            out.append(f"record {i} (id {rid}): '{key}' must be a string, got {type(rec[key]).__name__} {rec[key]!r}")
    if isinstance(rec.get("question_type"), str) and rec["question_type"].strip().lower() not in _CAPABILITY_OF:
        out.append(f"record {i} (id {rid}): unknown question_type {rec['question_type']!r} (expected one of {', '.join(sorted(_CAPABILITY_OF))})")
    if "question" in rec and not isinstance(rec["question"], str):
        out.append(f"record {i} (id {rid}): 'question' must be a string, got {type(rec['question']).__name__}")
    try:
        tags = tags_of(rec)
    except DataError:
        out.append(f"record {i} (id {rid}): 'tag' must be an int or a list of ints, got {rec.get('tag')!r}")
        return out
    # A multiple-choice record whose reference names no option would leave the MCQ denominator
    # (it was once scored as an open question, so the accuracy silently covered fewer records).
    if 0 in tags and isinstance(rec.get("answer"), str) and isinstance(rec.get("question", ""), str):
        if not rec["answer"].strip():
            out.append(f"record {i} (id {rid}): multiple-choice (tag 0) 'answer' is empty; give the reference letter")
        elif mcq_reference(rec)[0] is None:
            out.append(f"record {i} (id {rid}): multiple-choice (tag 0) 'answer' {rec['answer']!r} names no option "
                       f"({', '.join(options_in_question(rec.get('question', '')))}) and is not Yes/No; give the reference letter")
    return out


def check_records(records: Sequence[Any], where: str = "prediction records") -> None:
    """Refuse a predictions list with any malformed record, naming the file and EVERY bad record
    (a record left out would silently shrink a denominator)."""
    problems = [p for i, rec in enumerate(records) for p in record_problems(i, rec)]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{where}: {len(problems)} malformed record field(s), nothing was scored: {shown}. "
                        "Fix those records (each needs string 'pred', 'answer' and a known 'question_type')")


def score_predictions(
    records: Sequence[Mapping[str, Any]],
    judge_grades: Mapping[str, Sequence[float | None]] | None = None,
) -> dict[str, Any]:
    """Score DriveBench prediction records; returns a JSON-able report (see the module docstring)."""
    if not records:
        raise DataError("no prediction records to score: the predictions file is empty")
    check_records(records)
    rows = []  # (id, record, capability, question_type)
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise DataError(f"prediction record {i} is a {type(rec).__name__}, expected a JSON object")
        rid = record_id(rec)
        if "pred" not in rec:
            raise DataError(f"prediction record {i} (id {rid}) has no 'pred' field")
        if "question_type" not in rec:
            raise DataError(f"prediction record {i} (id {rid}) has no 'question_type' field")
        qtype = str(rec["question_type"]).strip().lower()
        rows.append((rid, rec, capability_of(qtype), qtype))

    unanswerable: list[str] = []
    mcq: dict[int, tuple[bool, bool]] = {}  # row index -> (correct, unanswerable)
    for i, (rid, rec, _, _) in enumerate(rows):
        if not is_mcq(rec):
            continue
        pred, ref = mcq_outcome(rec)  # ref is never None here: check_records refused such records
        if pred is None:
            unanswerable.append(rid)
        mcq[i] = (pred == ref, pred is None)

    grades = judge_grades or {}
    use_judge = bool(judge_grades) and any(any(v is not None for v in g) for g in grades.values())
    if use_judge:  # grades are keyed by id, so ids must be unique
        seen: dict[str, int] = {}
        for i, (rid, *_) in enumerate(rows):
            if rid in seen:
                raise DataError(
                    f"records {seen[rid]} and {i} share the id {rid!r}, so judge grades cannot be "
                    "told apart: give each record a unique 'id' field"
                )
            seen[rid] = i

    def summarise(subset: list[int]) -> dict[str, Any]:
        outcomes = [mcq[i] for i in subset if i in mcq]
        correct = sum(c for c, _ in outcomes)
        out: dict[str, Any] = {
            "n_questions": len(subset),
            "mcq_total": len(outcomes),
            "mcq_correct": correct,
            "mcq_accuracy": 100.0 * correct / len(outcomes) if outcomes else None,
            "unanswerable": sum(u for _, u in outcomes),
        }
        if use_judge:
            out["judge"] = _judge_stats([rows[i][0] for i in subset], grades)
        return out

    capabilities = {}
    for cap in CAPABILITIES:
        entry = summarise([i for i, row in enumerate(rows) if row[2] == cap])
        judge = entry.get("judge")
        entry["score"] = (judge["mean"] if judge else None) if use_judge else entry["mcq_accuracy"]
        if use_judge:
            entry["judge_coverage"] = f"{judge['n_graded'] if judge else 0}/{entry['n_questions']}"
        capabilities[cap] = entry

    question_types = {}
    for qtype in sorted({row[3] for row in rows}):
        subset = [i for i, row in enumerate(rows) if row[3] == qtype]
        question_types[qtype] = {"capability": rows[subset[0]][2], **summarise(subset)}

    scores = [capabilities[c]["score"] for c in CAPABILITIES]
    average = float(np.mean(scores)) if all(s is not None for s in scores) else None

    def item_score(i: int) -> float | None:
        grade = _record_grade(grades, rows[i][0])
        if grade is not None:
            return grade
        if i in mcq:
            return 100.0 if mcq[i][0] else 0.0
        return None  # open question without a grade

    cons = consistency((group_key(rec), cap, item_score(i)) for i, (_, rec, cap, _) in enumerate(rows))
    cons["score"] = "judge grade where graded, else MCQ correctness (0/100)"

    return {
        "n_records": len(rows),
        "score_definition": "judge_mean" if use_judge else "mcq_accuracy",
        "capabilities": capabilities,
        "question_types": question_types,
        "average": average,
        "table1": {**{c: capabilities[c]["score"] for c in CAPABILITIES}, "average": average},
        "unanswerable": {"count": len(unanswerable), "ids": unanswerable},
        "judge": (
            {
                "runs": max((len(g) for g in grades.values()), default=0),
                "per_capability": {c: capabilities[c].get("judge") for c in CAPABILITIES},
            }
            if use_judge
            else None
        ),
        "consistency": cons,
    }
