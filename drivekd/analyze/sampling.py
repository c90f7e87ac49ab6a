"""Which samples the pre-studies look at, and how question rewordings are marked.

Rewordings: a record that rephrases another record's question carries a `rewording_of` field
naming that record's sample id (its `id` field, or the content id drivekd derives, see
drivekd.ids). It must ask about the same images and carry the same capability label. Rewordings
are kept out of the per-question analyses (they would count one question twice) and are used only
for the dispersion under rewording: 1 - cos between a question and each of its rewordings.

The sampled set: originals grouped by their images (groups in data order), at most `per_image`
questions per group (the first ones in data order), groups visited in a seeded random order until
`samples` questions are taken (the last group cut to fit); then every rewording of a taken question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from drivekd.data.sample import Sample
from drivekd.errors import DataError
from drivekd.ids import explicit_id

REWORDING_FIELD = "rewording_of"


@dataclass(frozen=True)
class Selection:
    """The analysed samples in processing order: each image group's originals, then their rewordings."""

    groups: list[list[Sample]]  # per image group: originals then rewordings, group order = visit order
    rewording_of: dict[str, str]  # rewording id -> original id (only for selected rewordings)

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]

    def originals(self, group: list[Sample]) -> list[Sample]:
        return [s for s in group if s.id not in self.rewording_of]


def rewordings(samples: list[Sample], data_name: str = "the data") -> dict[str, str]:
    """{rewording id: original id} from the `rewording_of` fields, checked: the original exists, is
    not itself a rewording, and has the same images and capability. DataError naming the sample."""
    by_id = {s.id: s for s in samples}
    out: dict[str, str] = {}
    for s in samples:
        raw = s.record.get(REWORDING_FIELD) if isinstance(s.record, dict) else None
        if raw is None:
            continue
        if not isinstance(raw, (str, int)) or isinstance(raw, bool) or str(raw) == "":
            raise DataError(f"{data_name}: sample {s.id}: `{REWORDING_FIELD}` is {raw!r}; write the id of the sample it rewords")
        orig = explicit_id(raw)
        if orig not in by_id:
            raise DataError(f"{data_name}: sample {s.id}: `{REWORDING_FIELD}` names {orig!r}, which is no sample id in the "
                            "file; give the original an `id` field and name that id")
        if orig == s.id:
            raise DataError(f"{data_name}: sample {s.id}: `{REWORDING_FIELD}` names the sample itself")
        o = by_id[orig]
        if isinstance(o.record, dict) and o.record.get(REWORDING_FIELD) is not None:
            raise DataError(f"{data_name}: sample {s.id}: `{REWORDING_FIELD}` names {orig}, itself a rewording; "
                            "name the original question")
        if o.group_key != s.group_key:
            raise DataError(f"{data_name}: sample {s.id}: a rewording must ask about the same images as {orig}, in the same order")
        if o.capability != s.capability:
            raise DataError(f"{data_name}: sample {s.id}: a rewording must keep the capability of {orig} "
                            f"({o.capability}, not {s.capability})")
        out[s.id] = orig
    return out


def select(samples: list[Sample], n: int | None, per_image: int, seed: int = 0, data_name: str = "the data") -> Selection:
    """The sampled set (see the module docstring). n=None takes every group."""
    rw = rewordings(samples, data_name)
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        if s.id not in rw:
            groups.setdefault(s.group_key, []).append(s)
    order = list(groups)
    random.Random(seed).shuffle(order)
    by_orig: dict[str, list[Sample]] = {}
    by_id = {s.id: s for s in samples}
    for rid, orig in rw.items():
        by_orig.setdefault(orig, []).append(by_id[rid])
    taken: list[list[Sample]] = []
    left = n if n is not None else sum(min(per_image, len(g)) for g in groups.values())
    for key in order:
        if left <= 0:
            break
        members = groups[key][: min(per_image, left)]
        left -= len(members)
        taken.append(members + [r for s in members for r in by_orig.get(s.id, [])])
    chosen = {s.id for g in taken for s in g}
    return Selection(taken, {r: o for r, o in rw.items() if r in chosen})
