"""Caption metrics (BLEU-1..4, ROUGE-L, CIDEr, METEOR) exactly as the DriveLM challenge computes them.

Where the numbers come from: OpenDriveLab/DriveLM `challenge/evaluation.py` scores its tag-2
questions with `language_evaluation.CocoEvaluator(coco_types=["BLEU", "ROUGE_L", "CIDEr"])`
(bckim92/language-evaluation), a copy of the MS-COCO caption evaluation: the Stanford PTB tokenizer
(Java, lower-cased, punctuation tokens dropped), then the corpus-level `Bleu(4)`, `Rouge()` (ROUGE-L,
beta 1.2, the mean of per-pair scores) and `Cider()` (CIDEr-D, document frequencies from the
references of the evaluated set) scorers. drivekd calls the same scorers and the same tokenizer from
`pycocoevalcap` 1.2 (PyPI, the packaging of that code), so its numbers are the challenge's: the
bleu / rouge / cider scorer sources of the two packages are identical (checked by diff; only a
`verbose` argument differs), and so are the tokenizer jar (stanford-corenlp-3.4.1) and its
punctuation list. (language_evaluation also maps `_UNK` in references to `_UNKNOWN`; DriveLM's
answers hold no `_UNK`.)
Checked alternatives install here too but do not reproduce these numbers, so they are not used:
sacrebleu 2.6.0 keeps case and counts punctuation as tokens ("The cat sat on the mat." against "The
cat is on the mat.": its BLEU-4 0.489, the challenge's ~0, BLEU-1 6/7 against 5/6), and rouge-score
0.1.2's ROUGE-L is an F1 (beta 1) on its own tokens (0.833 on tests/fixtures/formats' DriveLM
language pairs, the challenge's beta-1.2 score 0.814).

The PTB tokenizer and METEOR run Java (`java` on PATH, any JRE >= 8; Debian: `apt-get install
default-jre-headless`); without it `LanguageMetricsUnavailable` names the problem and the challenge
score reports the language component as missing instead of guessing.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

from drivekd.errors import DriveKDError

BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
METRICS = ("BLEU", "ROUGE_L", "CIDEr", "METEOR")


class LanguageMetricsUnavailable(DriveKDError):
    """The caption metrics cannot run here (no Java, or pycocoevalcap not installed)."""


def check_available(metrics: Sequence[str] = ("BLEU", "ROUGE_L", "CIDEr")) -> None:
    """Raise LanguageMetricsUnavailable, saying how to fix it, when `metrics` cannot be computed here."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LanguageMetricsUnavailable(f"unknown language metric(s) {unknown}; use {', '.join(METRICS)}")
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise LanguageMetricsUnavailable(
            "pycocoevalcap is not installed: `pip install pycocoevalcap==1.2` (a drivekd dependency; "
            "the DriveLM challenge's BLEU / ROUGE-L / CIDEr come from it)"
        ) from None
    if shutil.which("java") is None:
        raise LanguageMetricsUnavailable(
            "no `java` on PATH: the PTB tokenizer the DriveLM challenge uses (and METEOR) is Java; "
            "install a JRE (Debian/Ubuntu: apt-get install default-jre-headless)"
        )


def _tokenize(texts: Sequence[str]) -> dict[int, list[str]]:
    """{i: [text i tokenized]}: the Stanford PTB tokenizer pycocoevalcap ships (lower-cased, one line per
    text), then pycocoevalcap's punctuation tokens dropped, as its PTBTokenizer does. Run here rather
    than through PTBTokenizer itself, which writes its temporary file into site-packages and prints to
    the terminal."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="drivekd-ptb-") as tmp:
        src = Path(tmp) / "texts.txt"
        src.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(src)]
        done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        raise LanguageMetricsUnavailable(f"the PTB tokenizer (java) failed with exit code {done.returncode}: "
                                         f"{done.stderr.decode('utf-8', 'replace')[-300:]}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts):
        raise LanguageMetricsUnavailable(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return {i: [" ".join(w for w in lines[i].rstrip().split(" ") if w not in ptb.PUNCTUATIONS)]
            for i in range(len(texts))}


def coco_scores(predictions: Sequence[str], references: Sequence[str],
                metrics: Sequence[str] = ("BLEU", "ROUGE_L", "CIDEr")) -> dict[str, float]:
    """Corpus-level caption metrics of predictions[i] against references[i] (one reference each).

    Returns the keys the DriveLM challenge prints, in its order: Bleu_1..Bleu_4, ROUGE_L, CIDEr
    (then METEOR when asked). Each is on the scorer's own scale: BLEU, ROUGE-L and METEOR in [0, 1],
    CIDEr in [0, 10] (CIDEr-D's x10).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no prediction / reference pairs to score")
    check_available(metrics)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    n = len(predictions)
    tokens = _tokenize([str(t) for t in (*predictions, *references)])  # one JVM start for both sides
    res = {i: tokens[i] for i in range(n)}
    gts = {i: tokens[n + i] for i in range(n)}
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        if "BLEU" in metrics:
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({k: float(v) for k, v in zip(BLEU_KEYS, bleu)})
        if "ROUGE_L" in metrics:
            out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in metrics:
            out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if "METEOR" in metrics:
            out["METEOR"] = _meteor(gts, res)
    return out


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # its pipes are closed by close() below
        meteor = Meteor()
        try:
            return float(meteor.compute_score(gts, res)[0])
        finally:
            with meteor.lock:
                for stream in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
                    if stream is not None:
                        stream.close()
                meteor.meteor_p.kill()
                meteor.meteor_p.wait()
