"""Training batches: sample order, target reading and collation, in DataLoader workers.

The order is a pure function of (seed, epoch): epoch e visits `randperm(n, seed, e)`, cut into
global micro-batches of `micro_batch * world` samples (the last one wrapped around to the start of
the permutation, as DistributedSampler pads). Rank r takes slice r of each global micro-batch. The
run is one stream of global micro-batches across epochs, so "resume at optimizer step s" is
"start the stream at micro-batch s * grad_accum": no sampler state beyond that number exists.

The Dataset yields (sample, {term name: SampleTargets}); the collate function (run in the workers)
builds the student's padded ModelInputs, checks each sample's token fingerprint against the
store's, and has each term's kind (drivekd.terms) place its targets at the sample's offset in the
padded batch (an attention term: each mean-over-group teacher map).
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
from drivekd.losses.recipes import TermPlan
from drivekd.store.targets import SampleTargets, TargetSource
from drivekd.terms import term_of


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
    """(sample, {term name: SampleTargets of what the term needs}) - its kind says what (`Term.reads`):
    an attention term's maps of its teacher layers; the KL term's logits; the hidden term's hidden
    states of its teacher layers."""

    def __init__(self, samples: list[Sample], source: TargetSource, terms: list[TermPlan]):
        self.samples = samples
        self.source = source
        self.needs = {t.name: (t.role, *term_of(t).reads(t)) for t in terms}

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
    # term name -> its kind's collated tensors (drivekd.terms): an attention term (its role): student
    # layer -> (B, T, T) fp32; "kl": logprobs / index (B, P, k), log_tail / mask (B, P), P = the batch's
    # answer positions (the CE's); "hidden": student layer -> (B, T, H_teacher), "mask" -> (B, T)
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
        targets: dict[str, dict] = {}
        for term in self.terms:
            per_sample = [tg[term.name] for _, tg in items]
            for lay, t in zip(inputs.layouts, per_sample):
                check_alignment(lay, t, term.role, self.source)
            targets[term.name] = term_of(term).collate(inputs, per_sample, term)
        tokens = int(inputs.tensors["attention_mask"].sum())
        return Batch(inputs, targets, [s.capability for s in samples], [s.id for s in samples], tokens)


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
