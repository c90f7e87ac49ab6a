"""LLM judge: grade predictions with fixed rubrics through an OpenAI-compatible chat endpoint.

Each prediction is graded `runs` times (DriveBench: 5). One rubric per question kind (METHOD.md
section 9), chosen by `rubric_for` from the DriveBench question_type and tag. The judge ends its
answer with `Total Score: N` (0-100); the last such line is the grade. A reply without one counts
as a failed grading and is retried like a transport error.

The API key is read from an environment variable whose *name* is given (default
DRIVEKD_JUDGE_API_KEY) and is only ever sent as the `Authorization: Bearer` header: it is scrubbed
from every log line and error message. With the variable unset no header is sent (local servers
such as vLLM need none).

Every raw judge answer is appended to a JSONL log (id, run, rubric, raw text, parsed grade,
temperature, time). The log doubles as a resume file: a grade already logged for the same record,
run, judge model, temperature and prompt is reused instead of asking again.

Sampling settings. DriveBench's GPT evaluation (worldbench/drivebench, evaluate/request.py and
evaluate/eval.py) asks its judge at temperature 0.0 with max_tokens 3000, once per record; the
Drive-KD paper grades five times and reports mean and standard deviation. drivekd follows
DriveBench's temperature 0.0 (`DRIVEBENCH_TEMPERATURE`) so that its scores compare with
DriveBench's: the five runs then differ only by the endpoint's own nondeterminism (a hosted GPT
model varies a little at temperature 0; a local greedy server such as vLLM not at all, std 0), so
the reported std is a floor on judge noise, not a sampling spread. Pass --judge-temperature 1.0 to
measure how much the grade moves when the judge samples (scores then no longer match DriveBench's
setting). max_tokens is not sent: a rubric answer is far below DriveBench's 3000 cap, and OpenAI's
reasoning models refuse the parameter.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from drivekd.errors import DataError, DriveKDError
from drivekd.eval.score import capability_of, is_mcq, record_id, tags_of

DEFAULT_KEY_ENV = "DRIVEKD_JUDGE_API_KEY"
DRIVEBENCH_TEMPERATURE = 0.0  # DriveBench's GPT evaluation (evaluate/request.py); see the module docstring


class JudgeError(DriveKDError):
    """The judge endpoint is unreachable, refuses the request, or answers in a way we cannot read."""


# ---------------------------------------------------------------------------------------------
# Rubrics (criteria and points from the paper's appendix, guidance in drivekd's own words)


@dataclass(frozen=True)
class Criterion:
    name: str
    points: int
    guidance: str


@dataclass(frozen=True)
class Rubric:
    name: str
    kind: str  # what is being graded, for the prompt
    criteria: tuple[Criterion, ...]


_NO_EXPLANATION = "If the prediction gives only a letter and no explanation, criteria 2 onwards get 0 points."

RUBRICS: dict[str, Rubric] = {
    "perception_mcq": Rubric(
        "perception_mcq",
        "a multiple-choice perception question about objects around the ego vehicle",
        (
            Criterion("Answer correctness", 50, "50 if the chosen option is the reference option, otherwise 0, however good the explanation."),
            Criterion("Object recognition", 10, "Names the relevant objects and describes them correctly (type, colour, size); deduct for missed, wrong or irrelevant objects."),
            Criterion("Object location and orientation", 15, "States where the objects are and which way they face relative to the ego vehicle, and what this means for the scene; deduct for wrong or missing spatial facts."),
            Criterion("Environmental condition awareness", 15, "Takes lighting, weather, occlusion or sensor limits into account where they matter; deduct when they are ignored."),
            Criterion("Clarity of reasoning", 10, "The explanation is logical, easy to follow and grammatical."),
        ),
    ),
    "behavior_mcq": Rubric(
        "behavior_mcq",
        "a multiple-choice question about how the ego vehicle or another road user behaves",
        (
            Criterion("Answer correctness", 50, "50 if the chosen option is the reference option, otherwise 0, however good the explanation."),
            Criterion("Behavioural understanding", 15, "Describes the motion (direction, speed change) correctly and consistently with the chosen option."),
            Criterion("Reasoning and justification", 15, "Explains from visible evidence why this behaviour is the right one; deduct for unsupported or contradictory claims."),
            Criterion("Contextual relevance", 10, "Refers to the road layout, traffic and other agents that actually bear on the behaviour."),
            Criterion("Clarity and grammar", 10, "Clear, concise and grammatical."),
        ),
    ),
    "planning_vqa": Rubric(
        "planning_vqa",
        "an open planning question: what the ego vehicle should do and why",
        (
            Criterion("Action prediction accuracy", 40, "The proposed ego action (keep going, turn, accelerate, brake, ...) matches the reference; full points only for the same or an equivalent action, fewer for unsafe or different ones."),
            Criterion("Reasoning", 20, "A clear, logical reason for the action that agrees with safety and the scene; deduct for gaps or contradictions."),
            Criterion("Probability / confidence", 15, "Gives a plausible likelihood or confidence that the action is safe and feasible, consistent with the reasoning; 0 if none is given when the reference gives one."),
            Criterion("Context and safety", 15, "Accounts for obstacles, other road users and the safety consequences of the action."),
            Criterion("Conciseness", 10, "Short and to the point; 0 if there is no explanation at all."),
        ),
    ),
    "perception_vqa": Rubric(
        "perception_vqa",
        "an open perception question about the motion of the ego vehicle or of objects in the scene",
        (
            Criterion("Action alignment", 20, "The stated action or direction (straight, left, right, stop, ...) matches the reference; 0 if no action is stated."),
            Criterion("Motion precision", 20, "The stated motion (speed up, slow down, constant speed) matches the reference in kind and degree; 0 if none is stated."),
            Criterion("Driving context", 15, "The answer fits the driving situation the reference implies."),
            Criterion("Situational awareness", 15, "Mentions the traffic participants and obstacles that matter for the motion."),
            Criterion("Conciseness", 20, "Brief, focused and unambiguous."),
            Criterion("Grammar", 10, "Grammatical and readable."),
        ),
    ),
    "prediction_vqa": Rubric(
        "prediction_vqa",
        "an open prediction question about which objects matter, their state and the ego response",
        (
            Criterion("Object identification and priority", 20, "Identifies the right objects in the right order of importance; deduct for missing, wrong or mis-ordered objects."),
            Criterion("Category and visual description", 20, "Gives each object's correct category and relevant visual attributes (colour, type, size)."),
            Criterion("Object state", 15, "States correctly whether each object is moving or stationary and how."),
            Criterion("Ego action", 15, "Recommends an appropriate ego action for each object."),
            Criterion("Logic", 20, "The prediction as a whole is consistent, step by step and plausible."),
            Criterion("Clarity", 10, "Clear, coherent and grammatical."),
        ),
    ),
}
for _r in RUBRICS.values():  # each rubric distributes exactly 100 points
    assert sum(c.points for c in _r.criteria) == 100, _r.name


def rubric_for(rec: Mapping[str, Any]) -> str:
    """The rubric name for a DriveBench record, from its question_type and tag.

    Multiple choice (tag 0 or a letter answer): perception -> perception_mcq, every other type ->
    behavior_mcq. Open: tag 1 -> planning_vqa, 2 -> perception_vqa, 3 -> prediction_vqa; without
    a tag the question_type decides (behavior questions are multiple choice in DriveBench).
    """
    qtype = str(rec.get("question_type", "")).strip().lower()
    if is_mcq(rec):
        return "perception_mcq" if capability_of(qtype) == "perception" else "behavior_mcq"
    for tag, name in ((1, "planning_vqa"), (2, "perception_vqa"), (3, "prediction_vqa")):
        if tag in tags_of(rec):
            return name
    by_type = {"planning": "planning_vqa", "perception": "perception_vqa", "prediction": "prediction_vqa"}
    return by_type.get(qtype, "behavior_mcq")


_SYSTEM = (
    "You are a strict examiner of an autonomous-driving assistant. You compare the assistant's "
    "answer with a reference answer and grade it with the rubric you are given. Award full points "
    "for a criterion only when it is met without error; be conservative."
)


def build_messages(rec: Mapping[str, Any], rubric: str) -> list[dict[str, str]]:
    """The chat messages asking the judge to grade one prediction with one rubric."""
    r = RUBRICS[rubric]
    lines = [f"Grade the assistant's answer to {r.kind}, from 0 to 100, with these criteria:", ""]
    for i, c in enumerate(r.criteria, 1):
        lines.append(f"{i}. {c.name} ({c.points} points): {c.guidance}")
    if rubric.endswith("_mcq"):
        lines += ["", _NO_EXPLANATION]
    lines += ["", f"Question:\n{rec.get('question', '')}", "", f"Reference answer:\n{rec.get('answer', '')}"]
    if rec.get("desc"):
        lines += ["", f"Reference description of the scene:\n{rec['desc']}"]
    lines += ["", f"Assistant's answer:\n{rec.get('pred', '')}", ""]
    lines.append("Give the points for each criterion on its own line, then a one-sentence summary, then finish with")
    lines.append("a last line of the form `Total Score: N`, where N (0-100) is the sum of the points.")
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


_TOTAL = re.compile(r"(?i)total\s*score\s*\**\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)")


def parse_total_score(text: str | None) -> float | None:
    """The grade on the last `Total Score: N` line (decimals allowed); None if absent or not in 0-100."""
    if not text:
        return None
    found = _TOTAL.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 0.0 <= value <= 100.0 else None


# ---------------------------------------------------------------------------------------------
# Client


def chat_completions_url(url: str) -> str:
    """`url` if it already ends in /chat/completions, else `url` + /chat/completions."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind  # "connection" | "http" | "malformed" | "no_score"
        self.detail = detail


class JudgeClient:
    """A minimal OpenAI-compatible chat-completions client with retries and exponential back-off.

    Retried: connection errors and timeouts, HTTP 408/429/5xx, malformed JSON, and replies without
    a `Total Score` line (see `grade`). Other HTTP errors fail at once.
    """

    def __init__(
        self,
        url: str,
        model: str,
        key_env: str = DEFAULT_KEY_ENV,
        temperature: float = DRIVEBENCH_TEMPERATURE,
        retries: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 120.0,
    ):
        if not url:
            raise JudgeError("no judge URL: pass --judge-url (an OpenAI-compatible base URL, e.g. http://host:8000/v1)")
        if retries < 0 or base_delay < 0:
            raise JudgeError("judge retries and base delay must be >= 0")
        self.endpoint = chat_completions_url(url)
        self.model = model
        self.key_env = key_env
        self.temperature = float(temperature)
        self.retries = int(retries)
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.timeout = float(timeout)
        self._key = os.environ.get(key_env) or None

    def __repr__(self) -> str:  # never shows the key
        return f"JudgeClient(endpoint={self.endpoint!r}, model={self.model!r}, key_env={self.key_env!r})"

    def scrub(self, text: str) -> str:
        """`text` with the API key (if any) replaced by ***."""
        return text.replace(self._key, "***") if self._key else text

    def _post(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = self.scrub(e.read()[:300].decode("utf-8", "replace"))
            if e.code in (408, 429) or e.code >= 500:
                raise _Retryable("http", f"HTTP {e.code}: {detail}") from None
            hint = f"; check the key in ${self.key_env}" if e.code in (401, 403) else ""
            raise JudgeError(f"judge endpoint {self.endpoint} refused the request: HTTP {e.code} {detail}{hint}") from None
        except http.client.HTTPException as e:  # the server did not speak HTTP properly
            raise _Retryable("malformed", self.scrub(f"bad HTTP reply: {type(e).__name__}: {e}")) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable("connection", self.scrub(f"{type(e).__name__}: {reason}")) from None
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
            if isinstance(content, list):  # content given as parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = self.scrub(raw[:200].decode("utf-8", "replace"))
            raise _Retryable("malformed", f"not a chat-completions JSON reply: {snippet!r}") from None
        return self.scrub(content)

    def grade(self, messages: list[dict[str, str]], on_answer: Callable[[str, float | None], None] | None = None,
              parse: Callable[[str | None], float | None] | None = None, expect: str = "a 'Total Score: N' line") -> float:
        """Ask until `parse` (default: `parse_total_score`) reads a grade from the reply; `on_answer(raw,
        grade)` sees every reply. `expect` says in errors what a readable reply holds."""
        parse = parse or parse_total_score
        failures: list[_Retryable] = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
            try:
                text = self._post(messages)
            except _Retryable as e:
                failures.append(e)
                continue
            grade = parse(text)
            if on_answer is not None:
                on_answer(text, grade)
            if grade is not None:
                return grade
            failures.append(_Retryable("no_score", f"no {expect} in: {text[-200:]!r}"))
        attempts = self.retries + 1
        last = failures[-1]
        if all(f.kind == "connection" for f in failures):
            raise JudgeError(
                f"judge endpoint {self.endpoint} is unreachable after {attempts} attempts ({last.detail}); "
                "check --judge-url and that the server is running"
            )
        if last.kind == "no_score":
            raise JudgeError(
                f"judge at {self.endpoint} answered {attempts} times without {expect} "
                f"(last: {last.detail}); check --judge-model"
            )
        raise JudgeError(f"judge endpoint {self.endpoint} failed {attempts} times; last error: {last.detail}")


@dataclass(frozen=True)
class JudgeSettings:
    """Everything the CLI's --judge-* flags set; `client()` builds the HTTP client."""

    url: str
    model: str
    key_env: str = DEFAULT_KEY_ENV  # name of the environment variable holding the key, not the key
    runs: int = 5  # gradings per prediction (the Drive-KD paper: 5; DriveBench's own scorer: 1)
    temperature: float = DRIVEBENCH_TEMPERATURE
    workers: int = 4  # concurrent requests
    retries: int = 5
    base_delay: float = 1.0  # seconds; doubles after every failed attempt
    timeout: float = 120.0  # seconds to wait for one reply before retrying

    def __post_init__(self) -> None:
        if not self.model:
            raise JudgeError("--judge-url needs --judge-model (the model name the endpoint serves)")
        if self.runs < 1:
            raise JudgeError(f"--judge-runs must be >= 1, got {self.runs}")
        if self.workers < 1:
            raise JudgeError(f"--judge-workers must be >= 1, got {self.workers}")
        if self.temperature < 0:
            raise JudgeError(f"--judge-temperature must be >= 0, got {self.temperature}")
        if not self.timeout > 0:
            raise JudgeError(f"--judge-timeout must be > 0 seconds, got {self.timeout}")

    def client(self) -> "JudgeClient":
        return JudgeClient(
            self.url, self.model, key_env=self.key_env, temperature=self.temperature,
            retries=self.retries, base_delay=self.base_delay, timeout=self.timeout,
        )


# ---------------------------------------------------------------------------------------------
# Grading many records


def _prompt_sha(messages: list[dict[str, str]]) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def load_judge_log(path: str | Path) -> list[dict[str, Any]]:
    """Entries of a judge log; unreadable lines (e.g. a truncated last line) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def grade_records(
    records: Sequence[Mapping[str, Any]],
    client: JudgeClient,
    runs: int = 5,
    log_path: str | Path | None = None,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Grade every record `runs` times; returns {record_id: [grade of run 0, run 1, ...]}.

    Raises JudgeError when a grading keeps failing after the client's retries.
    """
    if runs < 1:
        raise JudgeError(f"--judge-runs must be >= 1, got {runs}")
    if workers < 1:
        raise JudgeError(f"--judge-workers must be >= 1, got {workers}")
    ids = [record_id(r) for r in records]
    seen: dict[str, int] = {}
    for i, rid in enumerate(ids):
        if rid in seen:
            raise DataError(f"records {seen[rid]} and {i} share the id {rid!r}: give each record a unique 'id' field")
        seen[rid] = i

    prompts = []
    for rid, rec in zip(ids, records):
        rubric = rubric_for(rec)
        prompts.append((rid, rubric, build_messages(rec, rubric)))
    return grade_prompts(prompts, client, runs=runs, log_path=log_path, workers=workers, progress=progress)


def grade_prompts(
    prompts: Sequence[tuple[str, str, list[dict[str, str]]]],
    client: JudgeClient,
    runs: int = 5,
    log_path: str | Path | None = None,
    workers: int = 1,
    progress: bool = False,
    parse: Callable[[str | None], float | None] | None = None,
    expect: str = "a 'Total Score: N' line",
) -> dict[str, list[float]]:
    """Grade (id, rubric name, chat messages) prompts `runs` times each; {id: [grade per run]}.

    The engine under `grade_records`, also used with other prompts (the DriveLM challenge's,
    `drivekd.eval.challenge`): `parse` reads a grade from a reply (default `parse_total_score`),
    `expect` names what it looks for. The log / resume rules are those of the module docstring.
    """
    if runs < 1:
        raise JudgeError(f"--judge-runs must be >= 1, got {runs}")
    if workers < 1:
        raise JudgeError(f"--judge-workers must be >= 1, got {workers}")
    ids = [p[0] for p in prompts]
    jobs = []  # (run, id, rubric, messages, prompt sha), run-major so runs finish one after another
    for run in range(runs):
        for rid, rubric, messages in prompts:
            jobs.append((run, rid, rubric, messages, _prompt_sha(messages)))

    grades: dict[str, list[float | None]] = {rid: [None] * runs for rid in ids}
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Entries of logs written before the temperature was logged carry none: graded again.
        done = {
            (e.get("id"), e.get("run"), e.get("model"), e.get("temperature"), e.get("prompt_sha1")): e["grade"]
            for e in load_judge_log(log_path)
            if e.get("grade") is not None
        }
        todo = []
        for job in jobs:
            key = (job[1], job[0], client.model, client.temperature, job[4])
            if key in done:
                grades[job[1]][job[0]] = float(done[key])
            else:
                todo.append(job)
        jobs = todo
    lock = threading.Lock()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="judge", unit="grade")

    def log(run: int, rid: str, rubric: str, sha: str, raw: str, grade: float | None) -> None:
        if log_path is None:
            return
        entry = {
            "id": rid, "run": run, "rubric": rubric, "model": client.model, "temperature": client.temperature, "prompt_sha1": sha,
            "raw": raw, "grade": grade, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with lock, open(log_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def work(job) -> None:
        run, rid, rubric, messages, sha = job
        grade = client.grade(messages, on_answer=lambda raw, g: log(run, rid, rubric, sha, raw, g), parse=parse, expect=expect)
        with lock:
            grades[rid][run] = grade
            if bar is not None:
                bar.update(1)

    try:
        if workers == 1:
            for job in jobs:
                work(job)
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for future in [pool.submit(work, job) for job in jobs]:
                    future.result()
            finally:  # on the first failure, drop the queued gradings instead of running them
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
    return {rid: [float(g) for g in gs] for rid, gs in grades.items()}  # type: ignore[arg-type]
