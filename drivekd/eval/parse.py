"""Read the chosen option letter out of a model's free-text answer.

The public DriveBench scorer reads the English article "a" as option A. This parser only accepts
a letter where the text *states* an answer, in two tiers tried in order:

1. Answer statements: "Final: C", "Answer: C", "The answer is C", "Final answer - (C)",
   "The correct option is **C**", and the Drive-KD authors' template "Final: {A. Going ahead.}". Letters may be lowercase here ("answer: c"). When several appear
   the last one wins (a model that corrects itself ends with its final word).
2. A leading option marker: the text starts with "C", "C.", "C)", "(C)", "C:" or "**C**";
   and other markers anywhere: "(C)", "**C**", "Option C", "choose C", "C is correct". Without
   an answer statement these count only when they all name the same letter: "Option A or
   option B" and "B. Option A is wrong" are unanswerable.

Anything else returns None (unanswerable), which the scorer counts as wrong and lists by id.

Guards against words being read as letters:
* a letter must stand alone (never inside a word: "Cars" is not C);
* lowercase letters count only in explicit phrases ("answer: c", "option b"), never bare: the
  text "a" alone returns None (a lone lowercase "a" is more likely a cut-off sentence than a
  choice), while "A" alone returns A;
* "A", "I" and any lowercase letter are English words, so after them the parser also requires
  an end of answer: punctuation, end of text, a line break, a capitalised word ("Answer: A Going
  ahead") or a connective ("because", "since", ...). "Answer: a truck is ahead" is thus None.
"""

from __future__ import annotations

import re

DEFAULT_OPTIONS = "ABCD"

# After a word-like letter ("A", "I", lowercase), what may follow for it to count as an answer.
_CONNECTIVES = ("because", "since", "as", "is", "was", "which", "that", "so", "and", "or", "but", "with")
_END_PUNCT = set(".,;:!?)]}*\"'`-\u2013\u2014(/")

# Tier 1: answer statements. The separator must contain ":", "=", "-", or a copula ("is").
_STATEMENT = re.compile(
    r"(?i)\b(?:final(?:\s+answer)?|(?:correct|right|best|my)\s+(?:answer|option|choice)|answer)"
    r"(?P<sep>(?:\s*\*{0,2}\s*(?:[:=\-]|\bis\b|\bwould\s+be\b|\bshould\s+be\b|\bwill\s+be\b))+)"
    r"[\s*\"'`]*(?:(?:clearly|definitely|probably|likely)\s+)?(?:(?:option|choice)\s*)?[\(\[\{]?\s*\*{0,2}(?P<letter>[A-Za-z])(?![A-Za-z0-9])"
)
# Tier 2: the text opens with an option marker.
_LEADING = re.compile(r"^\s*(?:\*\*)?\s*[\(\[]?(?P<letter>[A-Z])(?:\*\*)?(?:[\)\].:]|(?=\s|$))(?![A-Za-z0-9])")
# Tier 3: markers anywhere.
_MARKERS = (
    re.compile(r"\((?P<letter>[A-Z])\)"),
    re.compile(r"\*\*\s*\(?(?P<letter>[A-Z])\)?\s*\.?\s*\*\*"),
    re.compile(r"(?i)\b(?:option|choice|choose|chose|select|pick|go\s+with)\s*[:#]?\s*[\(\[]?(?P<letter>[A-Za-z])(?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z0-9])(?P<letter>[A-Z])\s+is\s+(?:the\s+)?(?:correct|right|best)\b"),
    re.compile(r"(?m)^\s*(?P<letter>[A-Z])[\)\]:](?=\s|$)"),
)
# Option listings in a question: "A. Going ahead. B. Turn left." / "(A) ..." / "A) ...".
_OPTION_MARK = re.compile(r"(?:^|(?<=[\s:(\[]))\(?([A-Z])[.)]\s")


def options_in_question(question: str, default: str = DEFAULT_OPTIONS) -> str:
    """The option letters a question lists, e.g. "ABCDE"; `default` when it lists fewer than two.

    Letters must appear in order A, B, C, ... (the run stops at the first gap), so a stray
    "Mr. B. Smith" does not add options.
    """
    found = [m.group(1) for m in _OPTION_MARK.finditer(question)]
    letters = ""
    for letter in found:
        if letter == chr(ord("A") + len(letters)):
            letters += letter
    return letters if len(letters) >= 2 else default


def _word_like(letter: str) -> bool:
    return letter.islower() or letter in ("A", "I")


def _ends_answer(text: str, end: int) -> bool:
    """Does the text after a word-like letter close the answer (so the letter is not an article)?"""
    rest = text[end:]
    stripped = rest.lstrip(" \t")
    if not stripped or stripped[0] in "\r\n" or stripped[0] in _END_PUNCT:
        return True
    if len(stripped) == len(rest):  # letter directly followed by a non-space, non-punctuation char
        return False
    word = re.match(r"[A-Za-z]+", stripped)
    if word is None:
        return False
    return word.group(0)[0].isupper() or word.group(0).lower() in _CONNECTIVES


def _accept(text: str, m: re.Match, options: str, allow_lower: bool) -> str | None:
    letter = m.group("letter")
    if letter.islower() and not allow_lower:
        return None
    if letter.upper() not in options:
        return None
    if _word_like(letter) and not _ends_answer(text, m.end("letter")):
        return None
    return letter.upper()


def extract_choice(text: str | None, options: str = DEFAULT_OPTIONS) -> str | None:
    """The option letter a prediction states, or None when it states none (or contradicts itself).

    `options` are the valid letters (see `options_in_question`); letters outside them are ignored.
    """
    if not text:
        return None
    options = options.upper()
    # Tier 1: the last answer statement.
    stated = [c for m in _STATEMENT.finditer(text) if (c := _accept(text, m, options, allow_lower=True))]
    if stated:
        return stated[-1]
    # Tiers 2 and 3: a leading option marker ("C. Turn left", "(B)", "A" alone) and markers
    # anywhere ("(C)", "Option C"), only when they all agree.
    marked = {c for pattern in _MARKERS for m in pattern.finditer(text) if (c := _accept(text, m, options, allow_lower=True))}
    m = _LEADING.match(text)
    if m and (c := _accept(text, m, options, allow_lower=False)):
        marked.add(c)
    if len(marked) == 1:
        return marked.pop()
    return None


_YES_NO = re.compile(r"(?i)(?<![A-Za-z])(yes|no)(?![A-Za-z])")


def extract_yes_no(text: str | None) -> str | None:
    """"yes"/"no" for a Yes/No question: the answer statement if any, else the first word."""
    if not text:
        return None
    stated = re.findall(r"(?i)\b(?:final(?:\s+answer)?|answer)\s*(?:[:=\-]|\bis\b)\s*\**\s*(yes|no)(?![A-Za-z])", text)
    if stated:
        return stated[-1].lower()
    m = _YES_NO.match(text.lstrip(" \t\r\n*\"'("))
    return m.group(1).lower() if m else None
