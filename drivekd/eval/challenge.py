"""Scores as the DriveLM and RoboSense 2025 Track 1 challenges compute them (no model needed).

DriveLM (OpenDriveLab/DriveLM, `challenge/evaluation.py`, `challenge/gpt_eval.py`)
-------------------------------------------------------------------------------------
Questions are visited scene by scene, frame by frame, in the order perception + prediction +
planning + behavior; the i-th question of a frame has the submission id `<scene>_<frame>_<i>`
(`drivelm_questions`). Per frame:

* the first question is always scored, and it sets the frame's *graph*: the reference object
  coordinates its prediction matched (the match rule below);
* every later question is scored only when each coordinate pair in its question text is in that
  graph; the others are skipped (counted in `skipped`). A prediction of the first question that
  names no object therefore drops every later question about an object (the challenge's rule).

Each scored question goes to every bucket its `tag` names:

* tag 0, **accuracy**: the challenge compares strings (`answer == GT`); drivekd reads the choice
  with its parser (`drivekd.eval.parse`: letters, or Yes/No) and reports both, `accuracy` (parser,
  used in `final`) and `accuracy_exact` (string equality, the leaderboard's reading);
* tag 1, **chatgpt**: the mean LLM grade (0-100);
* tag 2, **language**: BLEU-1..4, ROUGE-L and CIDEr over the bucket (`drivekd.eval.language`, the
  challenge's own scorers), combined as score = (B1 + B2 + B3 + B4) / 4 / 3 + ROUGE_L / 3 +
  CIDEr / 10 / 3 (evaluation.py's normalisation: the BLEUs share a third, CIDEr is divided by 10);
* tag 3, **match**: (mean F1 x 100 + mean LLM grade) / 2, where F1 matches the prediction's
  coordinates to the reference's: every `\\d+\\.\\d+` number read in pairs (x, y) (an odd last
  number dropped; integers are not read), each predicted point greedily in turn to the nearest
  unmatched reference point by L1 distance, a match when that distance is below
  `MATCH_THRESHOLD` = 16 pixels; precision = TP / (TP + FP + 1e-8), recall = TP / (TP + FN +
  1e-8), F1 = 2PR / (P + R + 1e-8).

final = 0.4 x chatgpt / 100 + 0.2 x language + 0.2 x match / 100 + 0.2 x accuracy.

The LLM grade uses the challenge's prompt idea in drivekd's own words (`drivelm_judge_messages`:
rate the answer against the correct answer out of 100, reply with the number only; the challenge
asks gpt-3.5-turbo at temperature 0.6, once per question). The wording is paraphrased, not copied,
so grades from another judge model or wording may differ a little from the leaderboard's.

RoboSense 2025 Track 1 (robosense2025/track1, `README.md` "Evaluation Metrics")
------------------------------------------------------------------------------
Its scoring program runs on CodaBench and is not public; the README gives the formulas:

* Phase 1 = (N_MCQ x Accuracy_MCQ + N_VQA x LLMScore_VQA) / (N_MCQ + N_VQA), on 0-100;
* Phase 2 = (N_MCQ x Accuracy_MCQ + N_VQA x (0.1 ROUGE-L + 0.1 METEOR + 0.8 LLMScore)) / N, with
  ROUGE-L and METEOR taken x 100 here (drivekd's assumption: all terms on 0-100);
* Final = 0.2 x Phase 1 + 0.8 x Phase 2, over the two phases' *different* test sets: one file gives
  one phase's score, so drivekd reports both phase formulas for the file and no Final.

What the README leaves open is drivekd's rule, stated here: a question is MCQ when its reference is
an option letter of a question that lists options, or a bare Yes/No; other questions are VQA_obj
when they name an object (`<c1,CAM_FRONT,x,y>`), else VQA_scene (the README's split). MCQ accuracy
uses drivekd's parser; the LLM score is drivekd's judge with the DriveBench rubrics (`rubric_for`:
the track is "based on DriveBench"), one grade per question (mean over --judge-runs).

A component that cannot be computed (no judge, no Java for the language metrics, an empty bucket)
is reported as missing by name: `final` is then None and `final_partial` is the weighted sum of the
components present, never renormalised over them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

import json
from pathlib import Path

from drivekd.errors import DataError
from drivekd.fileio import atomic_write_text
from drivekd.eval.language import BLEU_KEYS, LanguageMetricsUnavailable, coco_scores
from drivekd.eval.parse import options_in_question
from drivekd.eval.score import mcq_outcome

DRIVELM_CATEGORY_ORDER = ("perception", "prediction", "planning", "behavior")
MATCH_THRESHOLD = 16.0  # pixels, L1 distance (evaluation.py match_result)
DRIVELM_WEIGHTS = {"chatgpt": 0.4, "language": 0.2, "match": 0.2, "accuracy": 0.2}
DRIVELM_JUDGE_TEMPERATURE = 0.6  # gpt_eval.py call_chatgpt
ROBOSENSE_PHASE2_WEIGHTS = {"rouge_l": 0.1, "meteor": 0.1, "llm": 0.8}

# A grader takes (id, prediction, reference, question) items and returns {id: grade 0-100}.
Grader = Callable[[Sequence[tuple[str, str, str, str]]], Mapping[str, float]]


# --------------------------------------------------------------------------------------- DriveLM


@dataclass(frozen=True)
class ChallengeQuestion:
    """One reference question in the DriveLM challenge's visiting order."""

    challenge_id: str  # `<scene>_<frame>_<i>`, i counted over the frame's questions in category order
    sample_id: str  # drivekd's id of the same question (`drivekd.ids.scene_frame_id`)
    scene: str
    frame: str
    category: str
    question: str  # as written
    answer: str  # the reference
    tags: tuple[int, ...]


def question_fields(sample) -> tuple[str, str, str, str, str, tuple[int, ...] | None]:
    """(scene, frame, category, question as written, reference, tags or None) of a DriveLM or
    RoboSense `Sample` (the loaders keep each format's record on it)."""
    rec = sample.record
    question = rec.get("Q", rec.get("question", sample.question))
    answer = rec.get("A", rec.get("answer", sample.answer))
    tag = rec.get("tag")
    tags = None if tag is None else tuple(int(t) for t in (tag if isinstance(tag, list) else [tag]))
    return (str(rec.get("scene_token", "")), str(rec.get("frame_token", "")), str(rec.get("category", sample.question_type)),
            str(question), str(answer), tags)


def drivelm_questions(samples: Sequence[Any], where: str = "--data") -> list[ChallengeQuestion]:
    """The questions of DriveLM / RoboSense samples in evaluation.py's order, with their submission ids.

    Scenes and frames keep the order they first appear in; inside a frame the categories go
    perception, prediction, planning, behavior, each in file order. Pass every sample of the file
    (not a --limit prefix), or the indices shift.
    """
    frames: dict[tuple[str, str], list[tuple[int, int, Any]]] = {}
    for k, s in enumerate(samples):
        if s.source not in ("drivelm", "robosense"):
            raise DataError(f"{where}: sample {s.id} is a {s.source or 'non-DriveLM'} record; DriveLM submission ids "
                            "need DriveLM or RoboSense records (scene_token, frame_token, category)")
        scene, frame, category, *_ = question_fields(s)
        rank = DRIVELM_CATEGORY_ORDER.index(category.strip().lower())
        frames.setdefault((scene, frame), []).append((rank, k, s))
    out = []
    for (scene, frame), items in frames.items():
        for i, (_, _, s) in enumerate(sorted(items, key=lambda t: (t[0], t[1]))):
            _, _, category, question, answer, tags = question_fields(s)
            out.append(ChallengeQuestion(f"{scene}_{frame}_{i}", s.id, scene, frame, category, question, answer,
                                         tags if tags is not None else ()))
    return out


_DECIMAL = re.compile(r"\d+\.\d+")


def coordinates(text: str, *, strict: bool = False, what: str = "text") -> list[tuple[float, float]]:
    """The (x, y) pairs DriveLM reads from a text: every decimal number (`\\d+\\.\\d+`), in pairs.

    An odd count drops the last number (how the challenge reads predictions); with `strict` (a
    reference or question text, which the challenge cannot read either) it is a DataError.
    """
    nums = [float(x) for x in _DECIMAL.findall(text or "")]
    if len(nums) % 2:
        if strict:
            raise DataError(f"{what} holds an odd number ({len(nums)}) of decimal coordinates; the DriveLM "
                            "evaluation reads them as (x, y) pairs and cannot score it: fix the reference")
        nums = nums[:-1]
    return [(nums[i], nums[i + 1]) for i in range(0, len(nums), 2)]


def match_f1(prediction: str, reference: str, threshold: float = MATCH_THRESHOLD,
             what: str = "reference") -> tuple[list[tuple[float, float]], float]:
    """(reference points matched, F1) of the predicted object coordinates against the reference's."""
    pred = coordinates(prediction)
    left = coordinates(reference, strict=True, what=what)
    n_ref = len(left)
    matched: list[tuple[float, float]] = []
    tp = fp = 0
    for px, py in pred:
        best, best_d = None, float("inf")
        for j, (gx, gy) in enumerate(left):
            d = abs(px - gx) + abs(py - gy)
            if d < best_d:  # the first of equally near points wins
                best, best_d = j, d
        if best is not None and best_d < threshold:
            tp += 1
            matched.append(left.pop(best))
        else:
            fp += 1
    fn = n_ref - tp
    precision = tp / (tp + fp + 1e-8)
    recall = tp / (tp + fn + 1e-8)
    return matched, 2 * precision * recall / (precision + recall + 1e-8)


def drivelm_language_score(metrics: Mapping[str, float]) -> float:
    """evaluation.py's language term: (B1 + B2 + B3 + B4) / 4 / 3 + ROUGE_L / 3 + CIDEr / 10 / 3."""
    return sum(metrics[k] for k in BLEU_KEYS) / 4 / 3 + metrics["ROUGE_L"] / 3 + metrics["CIDEr"] / 10 / 3


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _weighted(parts: Mapping[str, float | None], weights: Mapping[str, float]) -> tuple[float | None, float]:
    """(full weighted sum or None when a part is missing, the sum over the parts present)."""
    present = sum(weights[k] * v for k, v in parts.items() if v is not None)
    return (present if all(v is not None for v in parts.values()) else None), present


def score_drivelm(
    questions: Sequence[ChallengeQuestion],
    answers: Mapping[str, str],
    grader: Grader | None = None,
    *,
    language: bool = True,
    missing: str = "error",
    where: str = "predictions",
) -> dict[str, Any]:
    """The DriveLM challenge's scores of `answers` ({submission id: prediction}); see the module docstring.

    grader: LLM grades for the tag-1 and tag-3 questions (None: no judge, those parts are missing).
    language: compute BLEU / ROUGE-L / CIDEr (needs Java); False reports the part as missing.
    missing: "error" (a question without an answer is a DataError naming its id, as the challenge
    fails on it) or "skip" (left out and counted, for a --limit run).
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    known = {q.challenge_id for q in questions}
    unknown = [k for k in answers if k not in known]
    if unknown:
        raise DataError(f"{where}: {len(unknown)} answer id(s) are not questions of the reference file (first: "
                        f"{unknown[0]!r}); submission ids are <scene>_<frame>_<i>: check --data is the file the "
                        "predictions were made for")
    scored: list[tuple[ChallengeQuestion, str]] = []
    skipped: list[str] = []
    absent: list[str] = []
    frame, graph = None, set()
    for q in questions:
        if q.challenge_id not in answers:
            if missing == "error":
                raise DataError(f"{where}: no answer for question {q.challenge_id!r} ({q.category}: {q.question[:60]!r}); "
                                "the DriveLM evaluation needs every question of the reference file answered")
            absent.append(q.challenge_id)
            continue
        pred = str(answers[q.challenge_id])
        if (q.scene, q.frame) != frame:  # the frame's first question sets its graph
            frame = (q.scene, q.frame)
            graph = set(match_f1(pred, q.answer, what=f"reference answer of {q.challenge_id}")[0])
        elif not all(c in graph for c in coordinates(q.question, strict=True, what=f"question {q.challenge_id}")):
            skipped.append(q.challenge_id)
            continue
        scored.append((q, pred))

    acc_parser, acc_exact, unanswerable = [], [], []
    chat, lang, match = [], [], []
    for q, pred in scored:
        if 0 in q.tags:
            acc_exact.append(1.0 if pred == q.answer else 0.0)
            choice, ref = mcq_outcome({"question": q.question, "answer": q.answer, "pred": pred})
            if ref is None:  # neither a letter nor Yes/No: the string comparison is all there is
                acc_parser.append(acc_exact[-1])
            else:
                acc_parser.append(1.0 if choice == ref else 0.0)
                if choice is None:
                    unanswerable.append(q.challenge_id)
        if 1 in q.tags:
            chat.append((q, pred))
        if 2 in q.tags:
            lang.append((q, pred))
        if 3 in q.tags:
            match.append((q, pred, 100.0 * match_f1(pred, q.answer, what=f"reference answer of {q.challenge_id}")[1]))

    missing_parts: list[str] = []
    grades: Mapping[str, float] = {}
    to_grade = {q.challenge_id: (q.challenge_id, pred, q.answer, q.question) for q, pred in chat}
    to_grade.update({q.challenge_id: (q.challenge_id, pred, q.answer, q.question) for q, pred, _ in match})
    if grader is not None and to_grade:
        grades = grader(list(to_grade.values()))
    elif to_grade:
        missing_parts.append(f"chatgpt and match's GPT half: no judge for {len(to_grade)} tag-1/tag-3 question(s) "
                             "(pass --judge-url)")

    accuracy = _mean(acc_parser)
    if accuracy is None:
        missing_parts.append("accuracy: no scored tag-0 question")
    chatgpt = _mean([grades[q.challenge_id] for q, _ in chat]) if grades else None
    if not chat:
        missing_parts.append("chatgpt: no scored tag-1 question")

    lang_metrics, lang_score = None, None
    if not lang:
        missing_parts.append("language: no scored tag-2 question")
    elif not language:
        missing_parts.append("language: not computed (language metrics switched off)")
    else:
        try:
            lang_metrics = coco_scores([p for _, p in lang], [q.answer for q, _ in lang])
            lang_score = drivelm_language_score(lang_metrics)
        except LanguageMetricsUnavailable as e:
            missing_parts.append(f"language: {e}")

    f1 = _mean([f for _, _, f in match])
    match_gpt = _mean([grades[q.challenge_id] for q, _, _ in match]) if grades else None
    match_value = (f1 + match_gpt) / 2 if f1 is not None and match_gpt is not None else None
    if not match:
        missing_parts.append("match: no scored tag-3 question")

    parts = {"chatgpt": None if chatgpt is None else chatgpt / 100, "language": lang_score,
             "match": None if match_value is None else match_value / 100, "accuracy": accuracy}
    final, partial = _weighted(parts, DRIVELM_WEIGHTS)
    final_exact, partial_exact = _weighted({**parts, "accuracy": _mean(acc_exact)}, DRIVELM_WEIGHTS)
    return {
        "challenge": "drivelm",
        "rules": "OpenDriveLab/DriveLM challenge/evaluation.py",
        "n_questions": len(questions),
        "n_scored": len(scored),
        "skipped_by_graph": {"count": len(skipped), "ids": skipped},
        "unanswered": {"count": len(absent), "ids": absent},
        "accuracy": {"value": accuracy, "exact": _mean(acc_exact), "n": len(acc_parser),
                     "unanswerable": {"count": len(unanswerable), "ids": unanswerable}},
        "chatgpt": {"value": chatgpt, "n": len(chat)},
        "language": {"score": lang_score, "metrics": lang_metrics, "n": len(lang)},
        "match": {"value": match_value, "f1": f1, "gpt": match_gpt, "n": len(match), "threshold_px": MATCH_THRESHOLD},
        "grades": dict(grades),
        "weights": dict(DRIVELM_WEIGHTS),
        "final": final,
        "final_exact_accuracy": final_exact,
        "partial": final is None,
        "final_partial": partial,
        "final_partial_exact_accuracy": partial_exact,
        "missing": missing_parts,
    }


_SYSTEM_DRIVELM = "You grade an answer by how close it comes to the correct answer."


def drivelm_judge_messages(prediction: str, reference: str) -> list[dict[str, str]]:
    """The DriveLM grading prompt in drivekd's words (the challenge's gpt_eval.py asks the same thing:
    a score out of 100 for closeness to the correct answer, to the single digit, the number alone)."""
    user = ("Score my answer from 0 to 100 by how close it is to the correct answer: the closer, the higher. "
            "Be precise to the single point (for example 37, 64 or 91) and reply with that number and nothing else.\n"
            f"Correct answer: {reference}\nMy answer: {prediction}")
    return [{"role": "system", "content": _SYSTEM_DRIVELM}, {"role": "user", "content": user}]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number_grade(text: str | None) -> float | None:
    """The grade of a DriveLM-prompt reply: its first number, if it lies in 0-100 (else None: retried)."""
    m = _NUMBER.search(text or "")
    if m is None:
        return None
    value = float(m.group(0))
    return value if 0.0 <= value <= 100.0 else None


# ------------------------------------------------------------------------------------- RoboSense

_OBJECT_REF = re.compile(r"<c\d+,\s*CAM_[A-Z_]+,\s*[\d.]+,\s*[\d.]+>")
_YES_NO_ONLY = re.compile(r"(?i)^\s*(yes|no)\s*[.!]?\s*$")
_LETTER_ONLY = re.compile(r"^\s*\(?([A-Z])\)?\.?\s*$")


def robosense_kind(question: str, reference: str) -> str:
    """MCQ, VQA_obj or VQA_scene (the rule of the module docstring)."""
    m = _LETTER_ONLY.match(reference or "")
    if (m and m.group(1) in options_in_question(question, default="")) or _YES_NO_ONLY.match(reference or ""):
        return "MCQ"
    return "VQA_obj" if _OBJECT_REF.search(question or "") else "VQA_scene"


def score_robosense(
    records: Sequence[Mapping[str, Any]],
    grades: Mapping[str, float] | None = None,
    *,
    language: bool = True,
) -> dict[str, Any]:
    """RoboSense Track 1 scores of records {id, question, answer (reference), category, pred}.

    grades: {id: LLM grade 0-100} of the VQA records (None: no judge; the VQA parts are missing).
    language: compute ROUGE-L and METEOR for the phase-2 formula (needs Java).
    """
    rows = []
    for rec in records:
        kind = robosense_kind(str(rec["question"]), str(rec["answer"]))
        row = {"id": rec["id"], "category": str(rec["category"]).lower(), "kind": kind}
        if kind == "MCQ":
            choice, ref = mcq_outcome(rec)
            row["correct"] = choice is not None and choice == ref
            row["unanswerable"] = choice is None
        elif grades is not None and rec["id"] in grades:
            row["llm"] = float(grades[rec["id"]])
        rows.append(row)
    mcq = [r for r in rows if r["kind"] == "MCQ"]
    vqa = [r for r in rows if r["kind"] != "MCQ"]
    n = len(rows)
    acc = _mean([100.0 * r["correct"] for r in mcq])
    graded = [r["llm"] for r in vqa if "llm" in r]
    llm = _mean(graded) if vqa and len(graded) == len(vqa) else None
    missing_parts: list[str] = []
    if vqa and llm is None:
        missing_parts.append(f"LLM score: {len(vqa) - len(graded)} of {len(vqa)} open question(s) ungraded (pass --judge-url)")

    rouge = meteor = None
    vqa_recs = [rec for rec in records if robosense_kind(str(rec["question"]), str(rec["answer"])) != "MCQ"]
    if vqa_recs and language:
        try:
            m = coco_scores([str(r["pred"]) for r in vqa_recs], [str(r["answer"]) for r in vqa_recs],
                            metrics=("ROUGE_L", "METEOR"))
            rouge, meteor = 100.0 * m["ROUGE_L"], 100.0 * m["METEOR"]
        except LanguageMetricsUnavailable as e:
            missing_parts.append(f"ROUGE-L / METEOR (phase 2): {e}")
    elif vqa_recs:
        missing_parts.append("ROUGE-L / METEOR (phase 2): not computed (language metrics switched off)")

    mcq_sum = sum(100.0 * r["correct"] for r in mcq)
    phase1 = phase2 = None
    if n and (not vqa or llm is not None):
        phase1 = (mcq_sum + len(vqa) * (llm or 0.0)) / n
    if n and (not vqa or (llm is not None and rouge is not None and meteor is not None)):
        w = ROBOSENSE_PHASE2_WEIGHTS
        vqa_term = w["rouge_l"] * rouge + w["meteor"] * meteor + w["llm"] * llm if vqa else 0.0
        phase2 = (mcq_sum + len(vqa) * vqa_term) / n

    breakdown: dict[str, dict[str, Any]] = {}
    for r in rows:
        cell = breakdown.setdefault(r["category"], {}).setdefault(r["kind"], {"n": 0, "_v": []})
        cell["n"] += 1
        if r["kind"] == "MCQ":
            cell["_v"].append(100.0 * r["correct"])
        elif "llm" in r:
            cell["_v"].append(r["llm"])
    for kinds in breakdown.values():
        for kind, cell in kinds.items():
            values = cell.pop("_v")
            key = "accuracy" if kind == "MCQ" else "llm_score"
            cell[key] = _mean(values) if len(values) == cell["n"] else None
    unanswerable = [r["id"] for r in mcq if r["unanswerable"]]
    return {
        "challenge": "robosense",
        "rules": "robosense2025/track1 README.md (Evaluation Metrics); question kinds: drivekd's rule",
        "n_questions": n,
        "n_mcq": len(mcq),
        "n_vqa": len(vqa),
        "mcq_accuracy": acc,
        "vqa_llm_score": llm,
        "vqa_rouge_l": rouge,
        "vqa_meteor": meteor,
        "phase1": phase1,
        "phase2": phase2,
        "partial": phase1 is None,
        "phase1_partial": (mcq_sum / n) if n else None,  # the MCQ part alone, over all questions
        "breakdown": breakdown,
        "unanswerable": {"count": len(unanswerable), "ids": unanswerable},
        "missing": missing_parts,
        "grades": dict(grades or {}),
    }


def mean_grades(grades: Mapping[str, Iterable[float]]) -> dict[str, float]:
    """{id: mean over judge runs} of `grade_prompts` output."""
    return {k: float(np.mean(list(v))) for k, v in grades.items()}


# ------------------------------------------------------------------------------------- reports

CHALLENGE_JSON = "challenge.json"
CHALLENGE_MD = "challenge.md"


def _fmt(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def challenge_markdown(result: Mapping[str, Any], model: str | None = None) -> str:
    """challenge.md: the challenge's numbers, what is missing and why."""
    title = {"drivelm": "DriveLM", "robosense": "RoboSense Track 1"}[result["challenge"]]
    lines = [f"# {title} challenge scores: {model or 'model'}", "", f"Rules: {result['rules']}.", ""]
    if result["challenge"] == "drivelm":
        lang = result["language"]
        metrics = lang["metrics"] or {}
        lines += ["| Final | Accuracy | ChatGPT | Language | Match | Match F1 |", "|---:|---:|---:|---:|---:|---:|",
                  f"| {_fmt(result['final'], 4)} | {_fmt(result['accuracy']['value'], 4)} | {_fmt(result['chatgpt']['value'])} | "
                  f"{_fmt(lang['score'], 4)} | {_fmt(result['match']['value'])} | {_fmt(result['match']['f1'])} |", ""]
        lines.append("Language metrics: " + (", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "n/a") + ".")
        lines.append(f"Accuracy by the challenge's string equality: {_fmt(result['accuracy']['exact'], 4)} "
                     f"(final with it: {_fmt(result['final_exact_accuracy'], 4)}).")
        lines.append(f"{result['n_scored']} of {result['n_questions']} questions scored; "
                     f"{result['skipped_by_graph']['count']} skipped by the frame-graph rule; "
                     f"{result['unanswered']['count']} unanswered.")
    else:
        lines += ["| Phase 1 | Phase 2 | MCQ accuracy | VQA LLM score | VQA ROUGE-L | VQA METEOR |", "|---:|---:|---:|---:|---:|---:|",
                  f"| {_fmt(result['phase1'])} | {_fmt(result['phase2'])} | {_fmt(result['mcq_accuracy'])} | "
                  f"{_fmt(result['vqa_llm_score'])} | {_fmt(result['vqa_rouge_l'])} | {_fmt(result['vqa_meteor'])} |", ""]
        lines += ["| Category | Kind | Questions | Accuracy / LLM score |", "|---|---|---:|---:|"]
        for cat, kinds in result["breakdown"].items():
            for kind, cell in kinds.items():
                lines.append(f"| {cat} | {kind} | {cell['n']} | {_fmt(cell.get('accuracy', cell.get('llm_score')))} |")
    if result["missing"]:
        partial = result.get("final_partial", result.get("phase1_partial"))
        lines += ["", f"**Partial**: the final score is not defined without these components; the weighted sum of "
                      f"the components present is {_fmt(partial, 4)} (a lower bound, not renormalised):", ""]
        lines += [f"- {m}" for m in result["missing"]]
    return "\n".join(lines) + "\n"


def write_challenge(out_dir: str | Path, result: Mapping[str, Any], model: str | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"json": atomic_write_text(out_dir / CHALLENGE_JSON, json.dumps(result, indent=2, ensure_ascii=False) + "\n"),
            "md": atomic_write_text(out_dir / CHALLENGE_MD, challenge_markdown(result, model))}
