"""Training batches: sample order, target reading and collation, in DataLoader workers.

The order is a pure function of (seed, epoch): epoch e visits `randperm(n, seed, e)`, cut into
global micro-batches of `micro_batch * world` samples (the last one wrapped around to the start of
the permutation, as DistributedSampler pads). Rank r takes slice r of each global micro-batch. The
run is one stream of global micro-batches across epochs, so "resume at optimizer step s" is
"start the stream at micro-batch s * grad_accum": no sampler state beyond that number exists.

The Dataset yields (sample, {role: SampleTargets}); the collate function (run in the workers)
builds the student's padded ModelInputs, checks each sample's token fingerprint against the
store's, and places each (mean-over-group) teacher map at the sample's offset in the padded batch.
Reading and decoding thus overlap the model's compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from drivekd.data.sample import Sample
from drivekd.errors import AlignmentError, DriveKDError
from drivekd.families.base import Family, ModelInputs
from drivekd.losses.attention import place_maps
from drivekd.losses.recipes import TermPlan
from drivekd.store.targets import SampleTargets, TargetSource


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class StreamSampler(Sampler[list[int]]):
    """Local micro-batches (lists of sample indices) for stream positions [start, stop)."""

    def __init__(self, n: int, micro_batch: int, world: int, rank: int, seed: int, start: int, stop: int):
        self.n, self.mb, self.world, self.rank, self.seed = n, micro_batch, world, rank, seed
        self.start, self.stop = start, stop
        self.global_batch = micro_batch * world
        self.per_epoch = math.ceil(n / self.global_batch)

    def position(self, j: int) -> tuple[int, int]:
        """Stream index -> (epoch, micro-batch within the epoch)."""
        return divmod(j, self.per_epoch)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        cached = (-1, [])
        for j in range(self.start, self.stop):
            epoch, p = self.position(j)
            if cached[0] != epoch:
                order = epoch_order(self.n, self.seed, epoch)
                order = order + order[: self.per_epoch * self.global_batch - self.n]  # wrap-around padding
                cached = (epoch, order)
            g0 = p * self.global_batch + self.rank * self.mb
            yield cached[1][g0 : g0 + self.mb]


class TargetDataset(Dataset):
    """(sample, {term name: SampleTargets of what the term needs}): an attention term's maps of its
    teacher layers; the KL term's logits; the hidden term's hidden states of its teacher layers."""

    def __init__(self, samples: list[Sample], source: TargetSource, terms: list[TermPlan]):
        self.samples = samples
        self.source = source
        self.needs = {t.name: (t.role, t.teacher_layers, None) if t.attention else
                      (t.role, [], {t.signal: t.teacher_layers if t.signal == "hidden" else None}) for t in terms}

    def __len__(self) -> int:
        return len(self.samples)

    def _get(self, role: str, sid: str, layers: list[int], signals: dict | None) -> SampleTargets:
        return self.source.get(role, sid, layers, signals) if signals else self.source.get(role, sid, layers)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            return s, {name: self._get(role, s.id, layers, sig) for name, (role, layers, sig) in self.needs.items()}
        except DriveKDError as e:  # a damaged target: one clear line from the main process, not a worker traceback
            return s, Failed(e)


@dataclass
class Batch:
    inputs: ModelInputs
    # term name -> tensors: an attention term (its role): student layer -> (B, T, T) fp32;
    # "kl": logprobs / index (B, P, k), log_tail / mask (B, P), P = the batch's answer positions
    # (drivekd.losses.attention.answer_positions, the CE's); "hidden": student layer -> (B, T, H_teacher), "mask" -> (B, T)
    targets: dict[str, dict]
    capabilities: list[str]
    sample_ids: list[str]
    tokens: int  # real (non-padding) tokens

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader (pin_memory=True on GPU) so host-to-device copies can be async."""
        self.inputs.tensors = {k: v.pin_memory() for k, v in self.inputs.tensors.items()}
        self.targets = {r: {l: m.pin_memory() for l, m in d.items()} for r, d in self.targets.items()}
        return self

    def to(self, device) -> "Batch":
        self.inputs.to(device)
        self.targets = {r: {l: m.to(device, non_blocking=True) for l, m in d.items()} for r, d in self.targets.items()}
        return self


@dataclass
class Failed:
    """A DriveKDError raised in a worker, handed to the main process to re-raise as one line."""

    error: DriveKDError


def check_alignment(layout, t: SampleTargets, role: str, source: TargetSource) -> None:
    """The student's tokens must be the store's: same fingerprint. On a mismatch say where."""
    if layout.fingerprint == t.fingerprint:
        if not (torch.equal(layout.vision, t.vision.bool()) and torch.equal(layout.text, t.text.bool())):
            raise AlignmentError(
                f"sample {layout.sample_id}: same tokens as the {role} store but different vision/text masks; "
                "the store was built with another --text-tokens setting"
            )
        return
    Ts, Tt = layout.length, t.length
    what = f"length {Ts} (student) vs {Tt} (store)" if Ts != Tt else f"same length {Ts}"
    first = None
    ids = source.read_input_ids(role, layout.sample_id)
    if ids is not None:
        n = min(Ts, ids.numel())
        diff = (layout.input_ids[:n] != ids[:n]).nonzero()
        first = int(diff[0]) if len(diff) else n
    else:
        n = min(Ts, Tt)
        for name, a, b in (("vision", layout.vision[:n], t.vision[:n].bool()), ("text", layout.text[:n], t.text[:n].bool())):
            diff = (a != b).nonzero()
            if len(diff):
                first = min(first if first is not None else n, int(diff[0]))
        if first is None and Ts != Tt:
            first = n
    where = f", first differing position {first}" if first is not None else " (token ids differ; masks agree)"
    raise AlignmentError(
        f"sample {layout.sample_id}: the student's tokens differ from the {role} store's ({what}{where}); "
        "the store was built from other data, another processor or other image settings - rebuild it for this --data/--student"
    )


class Collate:
    """Samples + targets -> Batch (runs in DataLoader workers)."""

    def __init__(self, family: Family, terms: list[TermPlan], source: TargetSource, padding_side: str | None = None):
        self.family = family
        self.terms = terms
        self.source = source
        self.padding_side = padding_side

    def __call__(self, items) -> Batch | Failed:
        failed = [t for _, t in items if isinstance(t, Failed)]
        if failed:
            return failed[0]
        try:
            return self._collate(items)
        except DriveKDError as e:
            return Failed(e)

    def _collate(self, items) -> Batch:
        samples = [s for s, _ in items]
        inputs = self.family.build_inputs(samples, padding_side=self.padding_side)
        T = inputs.tensors["input_ids"].shape[1]
        targets: dict[str, dict[int, torch.Tensor]] = {}
        for term in self.terms:
            if not term.attention:
                for lay, (_, tg) in zip(inputs.layouts, items):
                    check_alignment(lay, tg[term.name], term.role, self.source)
                place = kl_targets if term.signal == "logits" else hidden_targets
                targets[term.name] = place(inputs, [tg[term.name] for _, tg in items], term)
                continue
            per_layer: dict[int, list[torch.Tensor]] = {s: [] for s, _ in term.pairs}
            for lay, (_, tg) in zip(inputs.layouts, items):
                t = tg[term.role]
                check_alignment(lay, t, term.role, self.source)
                for s_layer, t_layers in term.pairs:
                    # Layer-group matching: the student layer learns the mean of its teacher group.
                    m = t.maps[t_layers[0]] if len(t_layers) == 1 else torch.stack([t.maps[l] for l in t_layers]).mean(0)
                    per_layer[s_layer].append(m.float())
            targets[term.role] = {s: place_maps(ms, T, inputs.padding_side) for s, ms in per_layer.items()}
        tokens = int(inputs.tensors["attention_mask"].sum())
        return Batch(inputs, targets, [s.capability for s in samples], [s.id for s in samples], tokens)


def _offset(inputs: ModelInputs, lay) -> int:
    """Where sample `lay`'s position 0 sits in the padded batch."""
    return inputs.tensors["input_ids"].shape[1] - lay.length if inputs.padding_side == "left" else 0


def kl_targets(inputs: ModelInputs, tgs: list[SampleTargets], term: TermPlan) -> dict[str, torch.Tensor]:
    """The stored top-k distributions placed at the batch's answer positions (the rows of the
    student's kept logits): logprobs, index (B, P, k), log_tail, mask (B, P)."""
    from drivekd.losses.attention import answer_positions
    from drivekd.store.signals import answer_rows

    keep, _ = answer_positions(inputs.padded("labels"))  # (P,)
    B, P, k = len(tgs), keep.numel(), tgs[0].logits.logprobs.shape[-1]
    out = {"logprobs": torch.zeros(B, P, k), "index": torch.zeros(B, P, k, dtype=torch.long), "log_tail": torch.zeros(B, P),
           "mask": torch.zeros(B, P, dtype=torch.bool)}
    for b, (lay, t) in enumerate(zip(inputs.layouts, tgs)):
        rows = answer_rows(lay.labels)
        if not torch.equal(rows, t.logits.positions):
            raise AlignmentError(f"sample {lay.sample_id}: the store's {term.role} logits are for positions {t.logits.positions.tolist()[:5]}... "
                                 f"but the student's answer positions are {rows.tolist()[:5]}...; rebuild the store's logits for this --data/--student")
        j = torch.searchsorted(keep, rows + _offset(inputs, lay))
        out["logprobs"][b, j], out["index"][b, j], out["log_tail"][b, j] = t.logits.logprobs, t.logits.index, t.logits.log_tail
        out["mask"][b, j] = True
    return out


def hidden_targets(inputs: ModelInputs, tgs: list[SampleTargets], term: TermPlan) -> dict:
    """Per student layer the (mean-over-group) teacher hidden states at the stored text positions,
    placed in the padded batch: (B, T, H_teacher); "mask" (B, T) marks those positions."""
    T = inputs.tensors["input_ids"].shape[1]
    out: dict = {s: torch.zeros(len(tgs), T, term.teacher_width) for s, _ in term.pairs}
    out["mask"] = torch.zeros(len(tgs), T, dtype=torch.bool)
    for b, (lay, t) in enumerate(zip(inputs.layouts, tgs)):
        pos = t.hidden.positions + _offset(inputs, lay)
        out["mask"][b, pos] = True
        for s, ts in term.pairs:
            out[s][b, pos] = torch.stack([t.hidden.layers[l] for l in ts]).mean(0)  # layer-group matching, as the maps
    return out


def make_loader(dataset: TargetDataset, sampler: StreamSampler, collate: Collate, num_workers: int, seed: int,
                pin_memory: bool = False) -> DataLoader:
    # A generator of its own: the DataLoader draws a base seed from it on every iterator, which
    # would otherwise consume torch's global RNG and change later random draws.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=2 if num_workers > 0 else None,
    )
