"""The four pre-studies from the per-sample measures (pure functions; see measure.py for the axes).

Each per-sample record is `measure.sample_measures(...)` plus `id`, `capability`, `group` (index of
its image group) and `rewording_of` (original id or None). Definitions, per layer:

1. representation: `adjacent[l-1]` (l = 1..L) = mean over samples of each sample's mean over its
   positions of cos(h^l_t, h^{l-1}_t); `vision_text[l]` (l = 0..L) = mean over samples of
   cos(mean_V h^l, mean_X h^l).
2. intra_consistency[c][l]: per image group, the centre = mean of the last-text-token hidden state
   over that group's questions of capability c; the mean cosine over all pairs of groups' centres
   (null with fewer than two groups).
3. dispersion: `hidden[l]` = mean over image groups with >= 2 questions of the mean over question
   pairs of 1 - cos(last-text-token hidden states); `attention[k]` the same on the prefix
   attention profiles (measure.prefix_attention_profile) of decoder layer k; `*_by_capability`
   counts only pairs of one capability; `rewording.*` = mean over (question, rewording) pairs.
4. confidence[tau] = mean over samples of each sample's mean over answer tokens (measure.confidence).

Rewordings enter only `dispersion.rewording`; every other number uses the original questions.
Each mean is over samples (or groups, or pairs) with equal weight, stated with its count.
"""

from __future__ import annotations

import itertools
import math

import torch

from drivekd.analyze.measure import CONFIDENCE_FIELDS, cosine
from drivekd.errors import AlignmentError
from drivekd.roles import CAPABILITIES


def _mean_rows(rows: list[torch.Tensor]) -> list[float | None]:
    """Mean over samples of (n_layers,) rows, ignoring NaN entries; None where no sample has a value."""
    if not rows:
        return []
    m = torch.stack([r.double() for r in rows])  # (n, layers)
    ok = ~torch.isnan(m)
    s = torch.where(ok, m, torch.zeros_like(m)).sum(0)
    c = ok.sum(0)
    return [float(s[i] / c[i]) if c[i] else None for i in range(m.shape[1])]


def representation(recs: list[dict]) -> dict:
    out = {"adjacent": _mean_rows([r["adjacent"] for r in recs]), "vision_text": _mean_rows([r["vision_text"] for r in recs]),
           "n_samples": len(recs), "by_capability": {}}
    for c in CAPABILITIES:
        sub = [r for r in recs if r["capability"] == c]
        if sub:
            out["by_capability"][c] = {"adjacent": _mean_rows([r["adjacent"] for r in sub]),
                                       "vision_text": _mean_rows([r["vision_text"] for r in sub]), "n_samples": len(sub)}
    return out


def _mean_pairwise(vecs: list[torch.Tensor], fn) -> torch.Tensor | None:
    """vecs: list of (layers, D) -> (layers,) mean over unordered pairs of fn(cos) per layer."""
    pairs = list(itertools.combinations(range(len(vecs)), 2))
    if not pairs:
        return None
    return torch.stack([fn(cosine(vecs[i], vecs[j])) for i, j in pairs]).mean(0)


def intra_consistency(recs: list[dict]) -> dict:
    out = {}
    for c in CAPABILITIES:
        centres = []
        for g in sorted({r["group"] for r in recs}):
            hs = [r["last_hidden"].double() for r in recs if r["group"] == g and r["capability"] == c]
            if hs:
                centres.append(torch.stack(hs).mean(0))  # (L+1, D)
        m = _mean_pairwise(centres, lambda x: x)
        out[c] = {"cosine": None if m is None else m.tolist(), "n_images": len(centres)}
    return out


def _group_dispersion(recs: list[dict], key: str, same_capability: str | None = None) -> tuple[list[float] | None, int]:
    per_group = []
    for g in sorted({r["group"] for r in recs}):
        members = [r for r in recs if r["group"] == g and (same_capability is None or r["capability"] == same_capability)]
        if key == "prefix_attention":
            members = [r for r in members if r["prefix_len"] > 0]
            _check_same_prefix(members)
        d = _mean_pairwise([r[key] for r in members], lambda x: 1 - x)
        if d is not None:
            per_group.append(d)
    if not per_group:
        return None, 0
    return torch.stack(per_group).mean(0).tolist(), len(per_group)


def _check_same_prefix(members: list[dict]) -> None:
    for r in members[1:]:
        if not torch.equal(r["prefix_ids"], members[0]["prefix_ids"]):
            # Same images, different prefix tokens: the profiles are over different keys.
            raise AlignmentError(f"samples {members[0]['id']} and {r['id']} ask about the same images but their "
                             "system-and-image token blocks differ; their prefix attention cannot be compared")


def dispersion(originals: list[dict], reworded: list[dict], by_id: dict[str, dict]) -> dict:
    hid, n_h = _group_dispersion(originals, "last_hidden")
    att, n_a = _group_dispersion(originals, "prefix_attention")
    out = {"hidden": hid, "attention": att, "n_images": n_h, "by_capability": {}}
    for c in CAPABILITIES:
        h, n = _group_dispersion(originals, "last_hidden", c)
        a, _ = _group_dispersion(originals, "prefix_attention", c)
        if n:
            out["by_capability"][c] = {"hidden": h, "attention": a, "n_images": n}
    rh, ra = [], []
    for r in reworded:
        o = by_id[r["rewording_of"]]
        rh.append(1 - cosine(o["last_hidden"], r["last_hidden"]))
        if o["prefix_len"] > 0:
            _check_same_prefix([o, r])
            ra.append(1 - cosine(o["prefix_attention"], r["prefix_attention"]))
    out["rewording"] = {
        "hidden": torch.stack(rh).mean(0).tolist() if rh else None,
        "attention": torch.stack(ra).mean(0).tolist() if ra else None,
        "n_pairs": len(rh),
    }
    return out


def confidence(recs: list[dict], temperatures: list[float]) -> dict:
    def summarise(sub):
        rows = [r["confidence"] for r in sub if r["confidence"] is not None]
        if not rows:
            return None
        m = torch.stack([x.double() for x in rows]).mean(0)  # (n_tau, 3)
        return {f: [float(m[i, j]) for i in range(len(temperatures))] for j, f in enumerate(CONFIDENCE_FIELDS)} | {"n_samples": len(rows)}

    out = {"temperatures": list(temperatures), "all": summarise(recs), "by_capability": {}}
    for c in CAPABILITIES:
        s = summarise([r for r in recs if r["capability"] == c])
        if s:
            out["by_capability"][c] = s
    return out


# --------------------------------------------------------------------------- the suggestion

SUGGESTION_RULE = (
    "perception = the decoder layer whose output has the highest vision-text similarity (earliest on a tie); "
    "planning = among decoder layers 0..L-2 (the last one feeds the LM head), the one whose output has the highest "
    "planning intra-consistency (deepest on a tie; the recipe's L-2 when fewer than two images have planning "
    "questions); reasoning = every decoder layer from the shallower to the deeper of those two. Signal: attention "
    "(the recipes' t2v/full maps) when the prefix attention disperses less across questions of one image than the "
    "last-token hidden state, averaged over layers; otherwise the hidden state is the steadier signal and the note says so."
)


def relative_spec(k: int, L: int) -> str:
    """A layer index as a spec resolved per model depth: shallow half absolute, deep half as L-n."""
    return str(k) if k <= (L - 1) // 2 else f"L-{L - k}"


def _argbest(values: list[float | None], candidates: range, prefer_deep: bool) -> int | None:
    best = None
    for k in candidates:
        v = values[k]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if best is None or v > values[best] or (prefer_deep and v == values[best]):
            best = k
    return best


def suggest(analysis: dict, L: int) -> dict:
    """A [train] layer configuration for drivekd-train from the analyses, and the rule (SUGGESTION_RULE)."""
    vt = analysis["representation"]["vision_text"]  # hidden index l = output of decoder layer l-1
    notes = []
    perception = _argbest([vt[k + 1] for k in range(L)], range(L), prefer_deep=False)
    if perception is None:
        perception, _ = 0, notes.append("no sample had both vision and text tokens: perception keeps the recipe's layer 0")
    pc = analysis["intra_consistency"]["planning"]["cosine"]
    planning = None
    if pc is not None:
        planning = _argbest([pc[k + 1] for k in range(L)], range(max(1, L - 1)), prefer_deep=True)
    if planning is None:
        planning = max(0, L - 2)
        notes.append("fewer than two images with planning questions: planning keeps the recipe's layer L-2")
    lo, hi = sorted((perception, planning))
    d = analysis["dispersion"]
    signal = "attention"
    if d["hidden"] and d["attention"]:
        h = sum(d["hidden"][1:]) / L  # decoder-layer outputs only
        a = sum(d["attention"]) / L
        signal = "attention" if a <= h else "hidden"
        notes.append(f"mean dispersion across questions of one image: attention {a:.3g}, hidden state {h:.3g}")
        if signal == "hidden":
            notes.append("the hidden state disperses less than attention here: the recipes' attention signal is not "
                         "supported by this model and data (drivekd distils attention; consider the CE+Hidden baseline)")
    else:
        notes.append("no image with two or more questions: the signal comparison keeps the recipes' attention")
    specs = {"perception": relative_spec(perception, L),
             "reasoning": f"{relative_spec(lo, L)}..{relative_spec(hi, L)}" if hi > lo else relative_spec(lo, L),
             "planning": relative_spec(planning, L)}
    layers = ";".join(f"{r}={s}" for r, s in specs.items())
    return {
        "rule": SUGGESTION_RULE,
        "layers": {"perception": [perception], "reasoning": list(range(lo, hi + 1)), "planning": [planning]},
        "specs": specs,
        "signal": signal,
        "train_toml": f'[train]\nrecipe = "multi"\nlayers = "{layers}"\n',
        "cache_commands": [f"drivekd-cache build --teacher {r} --layers '{s}'" for r, s in specs.items()],
        "notes": notes,
    }


def analyse(records: list[dict], L: int, temperatures: list[float]) -> dict:
    """Every number of analysis.json (without the run metadata) from the per-sample records."""
    by_id = {r["id"]: r for r in records}
    originals = [r for r in records if r["rewording_of"] is None]
    reworded = [r for r in records if r["rewording_of"] is not None]
    out = {
        "representation": representation(originals),
        "intra_consistency": intra_consistency(originals),
        "dispersion": dispersion(originals, reworded, by_id),
        "confidence": confidence(originals, temperatures),
    }
    out["suggestion"] = suggest(out, L)
    return out
