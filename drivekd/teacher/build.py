"""`drivekd-cache build`: run each teacher once over every sample, store its head-mean attention.

Work is cut into fixed batches of the dataset order (batch b = samples[b*bs:(b+1)*bs]) whatever
is already stored, so a resumed or sharded build runs every forward with exactly the inputs of
an uninterrupted single-process build: the stored arrays are bit-identical. Under torchrun, rank
r takes batches b with b % world == r; ranks write disjoint sample groups.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from drivekd.data.loaders import load_samples
from drivekd.data.sample import Sample
from drivekd.distributed import Dist, fault_hook
from drivekd.errors import ConfigError, DataError, StoreError
from drivekd.families.base import Family, family_class, load_model
from drivekd.families.capture import capture_attention
from drivekd.images import ImageSettings
from drivekd.layers import LayerSpecError, check_spec, recipe_layers, resolve_layers, spec_of
from drivekd.roles import ROLES
from drivekd.store.lock import StoreLock
from drivekd.store.signals import DEFAULT_TOP_K, EXTRA, answer_rows, hidden_dtype, hidden_width, parse_signals, topk_logits, vocab_identity, vocab_rows
from drivekd.store.format import Encoding, pack_rows, teacher_fingerprint
from drivekd.store.zarr_store import TeacherStore


@dataclass
class BuildConfig:
    """Everything a build needs, validated before any model loads."""

    teachers: dict[str, Path]  # role -> checkpoint folder
    data: Path
    images: Path | None
    out: Path
    layers: dict[str, str | list[int]] | None = None  # role -> layer spec (drivekd.layers) or indices; None = recipe
    batch_size: int = 1
    encoding: Encoding = field(default_factory=Encoding)
    skip_bad: bool = False
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    image_processing: ImageSettings | dict | None = None  # [images] table / image flags, or raw processor kwargs
    text_tokens: str = "paper"  # the text query set X stored with each sample: paper | not_vision
    progress: bool = True
    share_prefix: bool = True  # run each image group's shared token prefix once
    # Signals to store (drivekd.store.signals): attention always; logits and hidden on request. A
    # store that lacks some of them for some samples gets only what is missing computed.
    signals: tuple[str, ...] = ("attention",)
    logits_top_k: int = DEFAULT_TOP_K  # k of the stored top-k next-token log-probabilities
    # Threads that quantise, compress and write (Blosc releases the GIL). With a fast GPU teacher
    # a reasoning role writes ~27 layers per sample: one thread would bound the build.
    writers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))

    def validate(self) -> None:
        if not self.teachers:
            raise ConfigError("no teacher: pass --teacher ROLE with --model DIR, or set [teachers] in drivekd.toml")
        for role, path in self.teachers.items():
            if role not in ROLES:
                raise ConfigError(f"--teacher: unknown role {role!r} (choose from {', '.join(ROLES)} or all)")
            if not Path(path).is_dir():
                raise ConfigError(f"--model for role {role}: {path} is not a folder (set --model or [teachers].{role} in drivekd.toml)")
        if not Path(self.data).is_file():
            raise ConfigError(f"--data {self.data}: no such file (or set [data].train in drivekd.toml)")
        for role, spec in (self.layers or {}).items():
            try:
                check_spec(spec_of(spec))
            except LayerSpecError as e:
                raise ConfigError(f"--layers for role {role}: {e}") from None
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.writers < 1:
            raise ConfigError(f"--writers must be >= 1, not {self.writers}")
        if self.text_tokens not in ("paper", "not_vision"):
            raise ConfigError(f"--text-tokens must be paper or not_vision, not {self.text_tokens!r}")
        self.signals = parse_signals(self.signals)
        if self.logits_top_k < 1:
            raise ConfigError(f"--logits-top-k must be >= 1, not {self.logits_top_k}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, not {self.dtype!r}")


def dataset_fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.question, s.answer, [str(p) for p in s.images]]).encode())
    return h.hexdigest()


def image_groups(samples: list[Sample]) -> list[list[Sample]]:
    """Samples grouped by their images, groups in order of first appearance, members in data order."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group_key, []).append(s)
    return list(groups.values())


def common_prefix_length(seqs: list[torch.Tensor]) -> int:
    n = min(int(x.numel()) for x in seqs)
    first = seqs[0][:n]
    same = torch.ones(n, dtype=torch.bool)
    for x in seqs[1:]:
        same &= x[:n] == first
    diff = (~same).nonzero()
    return int(diff[0]) if len(diff) else n


def _for_writer(m: torch.Tensor, row0: int = 0):
    """What the writer threads get: on a GPU, the packed fp16 rows (packing there is ~free and
    halves the transfer); on CPU, the fp32 tensor, packed by the writer to overlap the forward."""
    return pack_rows(m, row0) if m.is_cuda else m.float().cpu()


class _Pass:
    """The teacher pass over units of one checkpoint: forward, cut per sample, queue the writes.

    Per (sample, role) it computes only what is missing: the attention maps (with every signal
    the role lists, when the sample must be written anew), or just the signals a complete sample
    lacks (added beside its untouched attention files)."""

    def __init__(self, store, family, model, roles, layers, union, cfg, fault, totals, bar, wanted=None, n_tok=None):
        self.store, self.family, self.model, self.roles, self.layers = store, family, model, roles, layers
        self.union, self.cfg, self.fault, self.totals, self.bar = union, cfg, fault, totals, bar
        self.wanted = wanted or {r: () for r in roles}  # role -> extra signals it stores (logits, hidden)
        self.n_tok = n_tok  # tokenizer size: top-k ids stay below it
        self.writer = None
        self.pending = []

    def readable(self, unit: list[Sample]) -> list[Sample]:
        good = []
        for s in unit:
            try:
                self.family.images(s)  # decoded once per image group, reused by encode
                good.append(s)
            except DataError as e:
                if not self.cfg.skip_bad:
                    raise
                for r in self.roles:
                    self.store.mark_skipped(r, s.id, str(e))
                self.totals["skipped"] += 1
                self.bar.update(1)
        return good

    def _need(self, r: str, s: Sample) -> tuple[bool, list[str]]:
        """(attention must be written, extra signals to compute) for role r of sample s."""
        st = self.store
        # Complete with every file present; a sample marked complete with arrays missing is redone (with all its signals).
        if st.sample_status(r, s.id) != "complete" or st.missing_files(r, s.id):
            return True, list(self.wanted[r])
        return False, [n for n in self.wanted[r] if st.signal_missing_files(r, s.id, n)]

    def _forward_needs(self, needs: list[dict]) -> tuple[bool, list[int], bool]:
        """(capture attention, hidden layers, logits) a unit's forward must produce."""
        att = any(a for nd in needs for a, _ in nd.values())
        hid = sorted({l for nd in needs for r, (_, e) in nd.items() if "hidden" in e for l in self.layers[r]})
        return att, hid, any("logits" in e for nd in needs for _, e in nd.values())

    def _payload(self, extras: list[str], r: str, lay, logits_rows, hidden_full) -> dict:
        """A sample's signal arrays. logits_rows: (A, V) teacher logits at answer_rows(labels);
        hidden_full: layer -> (T, H) hidden states of the sample's own positions."""
        out = {}
        if "logits" in extras:
            lp, idx, tail = topk_logits(logits_rows, self.cfg.logits_top_k, self.n_tok)
            out["logits"] = {"logits_pos": answer_rows(lay.labels).to(torch.int32).numpy(), "logits_lp": lp, "logits_idx": idx, "logits_tail": tail}
        if "hidden" in extras:
            x = lay.text.nonzero().squeeze(-1)  # (X,) the text positions
            h = torch.stack([hidden_full[l][x.to(hidden_full[l].device)] for l in self.layers[r]]).float()  # (n_layers, X, H)
            out["hidden"] = {"hidden_pos": x.to(torch.int32).numpy(), "hidden": h.to(hidden_dtype(h)).cpu().numpy(), "layers": list(self.layers[r])}
        return out

    def _submit(self, fn, *args, **kw):
        fut = self.writer.submit(fn, *args, **kw)
        self.pending.append(fut)
        return fut

    def collect(self, wait: bool) -> None:
        done = [f for f in self.pending if wait or f.done()]
        self.totals["bytes"] += sum(f.result() for f in done)
        self.pending = [f for f in self.pending if f not in done]
        self.bar.set_postfix_str(f"{self.totals['bytes'] / 2**20:.1f} MiB fp16 written")

    def run_batch(self, good: list[Sample]) -> None:
        """Unshared: one padded forward over the batch, each sample's full map."""
        cfg = self.cfg
        needs = [{r: self._need(r, s) for r in self.roles} for s in good]
        att, hid, want_logits = self._forward_needs(needs)
        inputs = self.family.build_inputs(good).to(cfg.device)
        am = inputs.tensors["attention_mask"].bool()
        kw = {"output_hidden_states": True} if hid else {}
        keep = None
        if want_logits:
            from drivekd.losses.attention import answer_positions

            keep = answer_positions(inputs.padded("labels"))[0]  # (P,) padded positions: only the answer rows' logits
            kw["logits_to_keep"] = keep.to(cfg.device)
        with torch.no_grad(), capture_attention(self.model, self.union if att else [], attention_mask=am) as maps:
            out = self.model(**inputs.tensors, **kw)
        for b, (s, lay) in enumerate(zip(good, inputs.layouts)):
            pos = am[b].cpu().nonzero().squeeze(1)  # the sample's own rows/columns in the padded batch
            lo, hi = int(pos[0]), int(pos[-1]) + 1
            rows = None
            if want_logits:
                rows = out.logits[b, torch.searchsorted(keep, answer_rows(lay.labels) + lo).to(out.logits.device)]  # (A, V)
            hidden = {l: out.hidden_states[l + 1][b, lo:hi] for l in hid}
            for r in self.roles:
                a, extras = needs[b][r]
                payload = self._payload(extras, r, lay, rows, hidden)
                if a:
                    rmaps = [_for_writer(maps[l][b, lo:hi, lo:hi].contiguous()) for l in self.layers[r]]
                    self._submit(self.store.write_sample, r, s.id, lay.input_ids, lay.vision, lay.text, rmaps, self.layers[r], cfg.encoding, self.fault,
                                 signals=payload)
                elif payload:
                    self._submit(self.store.write_signals, r, s.id, payload, self.fault)
        self.totals["written"] += len(good)
        self.bar.update(len(good))

    def run_group(self, good: list[Sample]) -> None:
        """Shared: the group's common token prefix once, then each question's suffix against its KV cache."""
        cfg = self.cfg
        enc = [self.family.encode(s) for s in good]
        needs = [{r: self._need(r, s) for r in self.roles} for s in good]
        att, hid, _ = self._forward_needs(needs)
        member = [any(a or e for a, e in nd.values()) for nd in needs]
        rows = [answer_rows(lay.labels) if any("logits" in e for _, e in nd.values()) else None for (_, lay), nd in zip(enc, needs)]
        res = shared_forward(self.model, enc, self.union if att else [], member, cfg.device, hidden_layers=hid, logits_rows=rows)
        P, key = res.prefix_length, res.key
        prefix_ids = enc[0][1].input_ids[:P]
        prefix_done = {}
        for r in self.roles if att else []:
            if self.store.prefix_missing_files(r, key):
                prefix_done[r] = self._submit(self.store.write_prefix, r, key, prefix_ids, [_for_writer(res.prefix[l]) for l in self.layers[r]],
                                              self.layers[r], cfg.encoding, len(good), self.fault)
        for i, (s, (_, lay), smaps) in enumerate(zip(good, enc, res.suffixes)):
            for r in self.roles if smaps is not None else []:
                a, extras = needs[i][r]
                payload = self._payload(extras, r, lay, res.logits[i], {l: torch.cat([res.prefix_hidden[l], res.hidden[i][l]]) for l in hid})
                if a:
                    self._submit(self.store.write_sample, r, s.id, lay.input_ids, lay.vision, lay.text,
                                 [_for_writer(smaps[l], P) for l in self.layers[r]], self.layers[r], cfg.encoding, self.fault,
                                 prefix=(key, P), after=prefix_done.get(r), signals=payload)
                elif payload:
                    self._submit(self.store.write_signals, r, s.id, payload, self.fault)
            self.totals["written"] += 1
            self.bar.update(1)


@dataclass
class SharedMaps:
    prefix_length: int  # P
    key: str  # content hash of the prefix tokens and pixels
    prefix: dict[int, torch.Tensor]  # layer -> (P, P)
    suffixes: list[dict[int, torch.Tensor] | None]  # per sample: layer -> (T_i - P, T_i), None if not needed
    prefix_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (P, H) (hidden_layers only)
    hidden: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per sample: layer -> (T_i - P, H)
    logits: list[torch.Tensor | None] = field(default_factory=list)  # per sample: (A_i, V) at its logits_rows


def kv_cache_arg(model) -> str:
    """The name of the KV-cache argument (and output field) of `model.forward`: transformers 5.24
    renamed `past_key_values` to `cache` (the old name warns and goes in 5.40); earlier 5.x releases
    know only the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_forward(model, encoded, layers, need=None, device="cpu", hidden_layers=(), logits_rows=None) -> SharedMaps:
    """Head-mean maps of a group of samples that share their images, computing the shared prefix once.

    encoded: [(processor tensors, TokenLayout)] per sample (Family.encode, batch 1, unpadded).
    Under causal attention the first P rows of every member's map depend only on the common P
    tokens: they come from one prefix forward; each member then runs only its suffix against the
    prefix's KV cache. Equal to per-sample forwards within fp32 rounding.

    hidden_layers: also return those layers' hidden states (prefix once, each suffix's own rows);
    logits_rows: per sample, the positions (T_i,-coordinates) whose next-token logits to return, or None.
    """
    ids = [lay.input_ids for _, lay in encoded]
    need = need or [True] * len(encoded)
    # Every suffix keeps at least one token.
    P = min(common_prefix_length(ids), min(int(x.numel()) for x in ids) - 1)
    t0 = encoded[0][0]
    # The same token ids can carry other pixels: the key hashes both.
    h = hashlib.sha256(ids[0][:P].to(torch.int32).numpy().tobytes())
    h.update(t0["pixel_values"].float().numpy().tobytes())
    key = "p-" + h.hexdigest()[:32]
    prefix_in = {"input_ids": t0["input_ids"][:, :P], "attention_mask": t0["attention_mask"][:, :P], "pixel_values": t0["pixel_values"]}
    rope_positions = family_class(model.config.model_type).rope_positions
    full_pos = rope_positions(model, t0, device)  # (3, 1, T) for Qwen2.5-VL, None for 1-D RoPE
    if full_pos is not None:
        prefix_in.update(image_grid_thw=t0["image_grid_thw"], mm_token_type_ids=t0["mm_token_type_ids"][:, :P], position_ids=full_pos[..., :P])
    logits_rows = logits_rows or [None] * len(encoded)
    # Answer rows inside the prefix (only when questions share their first answer tokens): their
    # logits come from the prefix forward.
    in_prefix = sorted({int(t) for r in logits_rows if r is not None for t in r if t < P})
    extra = {"output_hidden_states": True} if hidden_layers else {}
    pkeep = torch.tensor(in_prefix or [P - 1])
    with torch.no_grad(), capture_attention(model, layers) as pmaps:
        out = model(**{k: v.to(device) for k, v in prefix_in.items()}, use_cache=True, logits_to_keep=pkeep.to(device), **extra)
    prefix_hidden = {l: out.hidden_states[l + 1][0] for l in hidden_layers}
    prefix_logits = out.logits[0]  # (len(pkeep), V)
    cache_arg = kv_cache_arg(model)
    cache = out[cache_arg]
    prefix = {l: m[0] for l, m in pmaps.items()}  # on the model's device
    suffixes: list[dict[int, torch.Tensor] | None] = []
    hidden, logits = [], []
    for (tens, lay), want, rows in zip(encoded, need, logits_rows):
        if not want:
            suffixes.append(None)
            hidden.append({})
            logits.append(None)
            continue
        T = lay.length
        pos = rope_positions(model, tens, device)
        suf = {
            "input_ids": tens["input_ids"][:, P:],
            "attention_mask": torch.ones(1, T, dtype=torch.long),
            "cache_position": torch.arange(P, T),
            # Explicit positions: the cached branch cannot rebuild M-RoPE positions itself.
            "position_ids": pos[..., P:] if pos is not None else torch.arange(P, T)[None],
        }
        if "mm_token_type_ids" in tens:
            suf["mm_token_type_ids"] = tens["mm_token_type_ids"][:, P:]
        skeep = (rows[rows >= P] - P) if rows is not None else torch.tensor([T - P - 1])
        with torch.no_grad(), capture_attention(model, layers) as smaps:
            sout = model(**{k: v.to(device) for k, v in suf.items()}, **{cache_arg: cache}, use_cache=True,
                         logits_to_keep=skeep.to(device), **extra)
        cache.crop(-(T - P))  # drop this suffix: back to the bare prefix for the next question
        suffixes.append({l: m[0] for l, m in smaps.items()})  # (T - P, T), on the model's device
        hidden.append({l: sout.hidden_states[l + 1][0] for l in hidden_layers})  # (T - P, H)
        if rows is None:
            logits.append(None)
        else:  # (A, V): rows in the prefix from the prefix forward, the others from this suffix's
            head = prefix_logits[torch.searchsorted(pkeep, rows[rows < P]).to(prefix_logits.device)]
            logits.append(torch.cat([head, sout.logits[0]]))
    return SharedMaps(P, key, prefix, suffixes, prefix_hidden, hidden, logits)


def write_error(e: OSError, store: TeacherStore, roles: list[str], left: int) -> StoreError:
    """One clear error for a failed store write: the file, the OS's reason and, for a full disk,
    the free space the remaining samples need (estimated from samples already on disk)."""
    import errno

    path = e.filename or store.path
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"cannot write the teacher store: {e.strerror or e} ({path}); the samples being written stay "
                          f"incomplete and the next `drivekd-cache build` redoes them")
    free = store.backend.free_bytes()
    per = [store.sample_bytes(r) for r in roles]
    need = sum(b for b in per if b) * max(left, 1)
    est = (f"the {max(left, 1)} sample(s) left need about {need / 2**20:.1f} MiB more (measured on samples already stored)"
           if need else "no sample is stored yet to estimate the space needed from")
    room = f"{free / 2**20:.1f} MiB free on that file system" if free is not None else "its free space is unknown"
    return StoreError(f"disk full while writing the teacher store at {path}: {room}; "
                      f"{est}. Free space (or pass another --out) and run the same `drivekd-cache build` again: it keeps every "
                      "complete sample and redoes the rest")


def build(cfg: BuildConfig) -> dict:
    """Build (or resume) the store. Returns a summary dict (rank 0's view after all ranks finish).

    Holds the store lock of its roles throughout (drivekd.store.lock): a second build of the same
    roles is refused naming this one, so no build ever deletes another's in-progress samples.
    """
    cfg.validate()
    # The process group follows the teacher's device (nccl on CUDA, gloo on CPU).
    dist = Dist(cfg.device)
    rank, world = dist.rank, dist.world
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = StoreLock(cfg.out, [r for r in ROLES if r in cfg.teachers]).acquire()
        except StoreError as e:
            refusal = str(e)
    if world > 1:  # the other ranks follow rank 0's lock
        import torch.distributed

        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise StoreError(refusal)
    try:
        return _build_locked(cfg, dist)
    finally:
        if lock is not None:
            lock.release()


def _build_locked(cfg: BuildConfig, dist: Dist) -> dict:
    rank, world = dist.rank, dist.world
    samples = load_samples(cfg.data, cfg.images, check_images=False)
    ids = [s.id for s in samples]
    store = TeacherStore(cfg.out, mode="a") if rank == 0 else None
    dist.barrier()
    store = store or TeacherStore(cfg.out, mode="a")

    # Roles that name the same checkpoint share one forward pass.
    by_ckpt: dict[Path, list[str]] = {}
    for role in ROLES:
        if role in cfg.teachers:
            by_ckpt.setdefault(Path(cfg.teachers[role]).resolve(), []).append(role)

    fault = fault_hook()
    totals = {"written": 0, "skipped": 0, "already": 0, "bytes": 0, "seconds": 0.0, "loop_seconds": 0.0}
    t0 = time.perf_counter()
    for ckpt, roles in by_ckpt.items():
        family = Family.from_pretrained(ckpt, image_processing=cfg.image_processing, text_tokens=cfg.text_tokens)
        ncfg = json.loads((ckpt / "config.json").read_text())
        L = int((ncfg.get("text_config") or ncfg)["num_hidden_layers"])
        layers = {}
        for role in roles:
            spec = (cfg.layers or {}).get(role)
            try:
                layers[role] = recipe_layers(role, L) if spec is None else resolve_layers(spec_of(spec), L)
            except LayerSpecError as e:
                raise ConfigError(f"--layers for role {role} (teacher {ckpt}): {e}") from None
        meta_common = {
            "family": family.name,
            "teacher_path": str(ckpt),
            "teacher_fingerprint": teacher_fingerprint(ckpt),
            "processor_fingerprint": family.fingerprint(),
            "image_settings": family.image_settings(),  # trainer names a mismatch (drivekd.images.check_store)
            "text_tokens": family.text_tokens,
            "num_teacher_layers": L,
            "encoding": cfg.encoding.to_dict(),
            "dataset_fingerprint": dataset_fingerprint(samples),
            "sample_ids": ids,
            "layout": "attn[k, i*(i+1)/2 + j] = A_layers[k][i, j] * (i + 1), j <= i, float16",
        }
        # Signals besides attention: their settings are recorded per role; a role keeps every
        # signal it ever stored, so a rebuilt sample gets all of them back.
        settings = {}
        if "logits" in cfg.signals:
            settings["logits"] = {"top_k": cfg.logits_top_k, "positions": "answer", "vocab_size": vocab_rows(ncfg), **vocab_identity(family.tokenizer)}
        refusal = None
        if rank == 0:
            try:
                for role in roles:
                    store.init_role(role, {**meta_common, "role": role, "layers": layers[role]}, overwrite=cfg.overwrite)
                    role_settings = dict(settings)
                    if "hidden" in cfg.signals:
                        role_settings["hidden"] = {"layers": layers[role], "hidden_size": hidden_width(ncfg), "positions": "text", "dtype": "float16"}
                    if role_settings:
                        store.add_signals(role, role_settings, overwrite=cfg.overwrite)
            except StoreError as e:
                refusal = str(e)
        if dist.world > 1:
            from torch.distributed import broadcast_object_list

            box = [refusal]
            broadcast_object_list(box, src=0)
            refusal = box[0]
        if refusal:
            raise StoreError(refusal)
        dist.barrier()
        wanted = {r: tuple(n for n in EXTRA if n in store.role_meta(r).get("signals", {})) for r in roles}

        union = sorted(set().union(*layers.values()))
        # Units of work, fixed by the dataset order whatever is already stored: image groups when
        # sharing prefixes (a group's prefix runs once), else fixed batches.
        units = image_groups(samples) if cfg.share_prefix else [samples[i : i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
        mine = [u for k, u in enumerate(units) if k % world == rank]
        todo = [u for u in mine if not all(store.is_done(r, s.id, wanted[r]) for s in u for r in roles)]
        totals["already"] += sum(len(u) for u in mine) - sum(len(u) for u in todo)
        if not todo:
            continue
        dtype = getattr(torch, cfg.dtype)
        model = load_model(ckpt, dtype=dtype, device=cfg.device).eval()
        bar = tqdm(total=sum(len(u) for u in todo), desc=f"teacher {'+'.join(roles)}", unit="sample",
                   disable=not cfg.progress or rank != 0, dynamic_ncols=True)
        t_loop = time.perf_counter()
        pass_ = _Pass(store, family, model, roles, layers, union, cfg, fault, totals, bar, wanted,
                      vocab_identity(family.tokenizer)["tokenizer_size"])
        # Writer threads: packing (on CPU), compression and file writes overlap the next forward.
        try:
            with ThreadPoolExecutor(max_workers=cfg.writers) as writer:
                pass_.writer = writer
                for unit in todo:
                    good = pass_.readable(unit)
                    if cfg.share_prefix and len(good) > 1:
                        pass_.run_group(good)
                    elif good:
                        pass_.run_batch(good)
                    pass_.collect(wait=False)
                pass_.collect(wait=True)
        except OSError as e:
            # A failed write never reaches its sample's completion mark: it stays "writing" and
            # the next build redoes it. Say what failed and how much room the rest needs.
            left = sum(len(u) for u in todo) - totals["written"] - totals["skipped"]
            raise write_error(e, store, roles, left) from None
        totals["loop_seconds"] += time.perf_counter() - t_loop  # teacher pass after the model loaded
        bar.close()
    dist.barrier()
    totals["seconds"] = time.perf_counter() - t0
    if world > 1:
        t = dist.sum_(torch.tensor([totals["written"], totals["skipped"], totals["already"]], dtype=torch.float64, device=dist.device))
        totals["written"], totals["skipped"], totals["already"] = (int(x) for x in t.tolist())
    summaries = {r: store.summary(r) for r in ROLES if r in cfg.teachers} if rank == 0 else {}
    return {"rank": rank, "world": world, **totals, "roles": summaries}
