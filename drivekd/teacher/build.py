"""`drivekd-cache build`: run each teacher once over every sample, store its head-mean attention.

The settings are drivekd.teacher.config.BuildConfig (importable from here too), the forward of a
group sharing its images drivekd.teacher.forward; this module drives them and the store's writer.

Work is cut into fixed batches of the dataset order (batch b = samples[b*bs:(b+1)*bs]) whatever
is already stored, so a resumed or sharded build runs every forward with exactly the inputs of
an uninterrupted single-process build: the stored arrays are bit-identical. Under torchrun, rank
r takes batches b with b % world == r; ranks write disjoint sample groups. With
`--teacher-parallel tp` the unit of that split is a tensor-parallel group of ranks (one teacher
replica, drivekd.teacher.parallel): group g takes batches b % (world / tp) == g, every rank of the
group runs the same forwards, and only the group's first rank writes.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from drivekd.data.loaders import load_samples
from drivekd.data.sample import Sample
from drivekd.distributed import Dist, fault_hook
from drivekd.errors import ConfigError, DataError, DriveKDError, ModelError, StoreError
from drivekd.families.base import Family
from drivekd.families.capture import capture_attention
from drivekd.fileio import write_error as file_write_error
from drivekd.layers import LayerSpecError, recipe_layers, resolve_layers, spec_of
from drivekd.roles import ROLES
from drivekd.store.format import pack_rows, checkpoint_fingerprint
from drivekd.store.integrity import NonFiniteTargets
from drivekd.store.lock import StoreLock
from drivekd.store.signals import EXTRA, answer_rows, hidden_dtype, hidden_width, topk_logits, vocab_identity, vocab_rows
from drivekd.store.zarr_store import TeacherStore
from drivekd.teacher.config import BuildConfig
from drivekd.teacher.forward import image_groups, shared_forward
from drivekd.teacher.parallel import Topology, check_checkpoint, input_device, load_teacher, rank_parameters, tp_size_for, world_from_env


def dataset_fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.question, s.answer, [str(p) for p in s.images]]).encode())
    return h.hexdigest()


def _for_writer(m: torch.Tensor, row0: int = 0):
    """What the writer threads get: on a GPU, the packed fp16 rows (packing there is ~free and
    halves the transfer); on CPU, the fp32 tensor, packed by the writer to overlap the forward."""
    return pack_rows(m, row0) if m.is_cuda else m.float().cpu()


class _Pass:
    """The teacher pass over units of one checkpoint: forward, cut per sample, queue the writes.

    Per (sample, role) it computes only what is missing: the attention maps (with every signal
    the role lists, when the sample must be written anew), or just the signals a complete sample
    lacks (added beside its untouched attention files)."""

    def __init__(self, store, family, model, roles, layers, union, cfg, fault, totals, bar, wanted=None, n_tok=None, writes=True, device=None):
        self.store, self.family, self.model, self.roles, self.layers = store, family, model, roles, layers
        self.union, self.cfg, self.fault, self.totals, self.bar = union, cfg, fault, totals, bar
        self.wanted = wanted or {r: () for r in roles}  # role -> extra signals it stores (logits, hidden)
        self.n_tok = n_tok  # tokenizer size: top-k ids stay below it
        # A tensor-parallel group's ranks all compute the same maps; only its first rank writes.
        self.writes = writes
        self.device = device  # where inputs go: the teacher's device (the first GPU under a device map)
        self.writer = None
        self.pending = []
        self.nonfinite: dict[str, str] = {}  # sample id -> why it was skipped (--skip-nonfinite)

    def readable(self, unit: list[Sample]) -> list[Sample]:
        good = []
        for s in unit:
            try:
                self.family.images(s)  # decoded once per image group, reused by encode
                good.append(s)
            except DataError as e:
                if not self.cfg.skip_bad:  # only the build can skip, so only it names --skip-bad
                    raise DataError(f"{e}, or pass --skip-bad to record it as skipped") from e
                for r in self.roles if self.writes else ():
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
        if not self.writes:
            return None
        fut = self.writer.submit(self._guarded, fn, *args, **kw)
        self.pending.append(fut)
        return fut

    def _guarded(self, fn, *args, **kw) -> int:
        """Run one write in a writer thread. A sample whose targets are not finite was refused by
        the writer before its completion mark; with --skip-nonfinite it is recorded as skipped
        with the reason, else the error stops the build (in `collect`)."""
        try:
            return fn(*args, **kw)
        except NonFiniteTargets as e:
            if e.sample_id is None or not self.cfg.skip_nonfinite:
                raise  # a shared prefix: each member waits on it and reports itself
            reason = f"non-finite teacher targets ({e.what})"
            self.store.mark_skipped(e.role, e.sample_id, reason)
            self.nonfinite[e.sample_id] = f"{e.role}: {reason}"
            return 0

    def collect(self, wait: bool) -> None:
        done = [f for f in self.pending if wait or f.done()]
        for f in done:
            e = f.exception()
            if isinstance(e, NonFiniteTargets) and e.sample_id is None:
                continue  # a non-finite shared prefix: its member samples report (or skip) themselves
            self.totals["bytes"] += f.result()
        self.pending = [f for f in self.pending if f not in done]
        self.bar.set_postfix_str(f"{self.totals['bytes'] / 2**20:.1f} MiB fp16 written")

    def run_batch(self, good: list[Sample]) -> None:
        """Unshared: one padded forward over the batch, each sample's full map."""
        cfg = self.cfg
        needs = [{r: self._need(r, s) for r in self.roles} for s in good]
        att, hid, want_logits = self._forward_needs(needs)
        inputs = self.family.build_inputs(good).to(self.device)
        am = inputs.tensors["attention_mask"].bool()
        kw = {"output_hidden_states": True} if hid else {}
        keep = None
        if want_logits:
            from drivekd.losses.attention import answer_positions

            keep = answer_positions(inputs.padded("labels"))[0]  # (P,) padded positions: only the answer rows' logits
            kw["logits_to_keep"] = keep.to(self.device)
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
        res = shared_forward(self.model, enc, self.union if att else [], member, self.device, hidden_layers=hid, logits_rows=rows)
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


def teacher_depth(ckpt: Path) -> int:
    """Decoder layers of the teacher's language model, from its config.json (no weights read)."""
    ncfg = json.loads((ckpt / "config.json").read_text())
    return int((ncfg.get("text_config") or ncfg)["num_hidden_layers"])


def resolve_build_layers(cfg: BuildConfig) -> tuple[dict[str, list[int]], dict[str, int]]:
    """(role -> the teacher layers it stores, role -> its teacher's depth L): each role's --layers
    spec, or its recipe's, resolved against its own teacher's depth before anything is written."""
    layers, depth = {}, {}
    for role in ROLES:
        if role not in cfg.teachers:
            continue
        ckpt = Path(cfg.teachers[role]).resolve()
        try:
            depth[role] = L = teacher_depth(ckpt)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"--model for role {role}: cannot read the teacher's depth from {ckpt / 'config.json'} "
                             f"({type(e).__name__}: {e}); pass a Hugging Face checkpoint folder") from None
        spec = (cfg.layers or {}).get(role)
        try:
            layers[role] = recipe_layers(role, L) if spec is None else resolve_layers(spec_of(spec), L)
        except LayerSpecError as e:
            raise ConfigError(f"--layers for role {role} (teacher {ckpt}): {e}") from None
    return layers, depth


def build(cfg: BuildConfig, say: Callable[[str], None] | None = None) -> dict:
    """Build (or resume) the store. Returns a summary dict (rank 0's view after all ranks finish).

    Holds the store lock of its roles throughout (drivekd.store.lock): a second build of the same
    roles is refused naming this one, so no build ever deletes another's in-progress samples.
    say: called (rank 0) with one line per role naming the layers it stores, once they are resolved.
    """
    cfg.validate()
    layers, depth = resolve_build_layers(cfg)
    tp = tp_size_for(cfg.teacher_parallel, cfg.tp_size, world_from_env())
    for ckpt in {Path(p).resolve() for p in cfg.teachers.values()}:
        check_checkpoint(ckpt, tp)  # heads and widths split evenly, before the process group or any weight
    # The process group follows the teacher's device (nccl on CUDA, gloo on CPU).
    dist = Dist(cfg.device)
    rank, world = dist.rank, dist.world
    if say is not None and rank == 0:
        for role, ls in layers.items():
            spec = (cfg.layers or {}).get(role)
            how = "recipe" if spec is None else f"--layers {spec if isinstance(spec, str) else ','.join(map(str, spec))}"
            say(f"{role}: teacher layers {ls} ({how}, of {depth[role]} in {Path(cfg.teachers[role]).name})")
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
        return _build_locked(cfg, dist, layers, depth, Topology(rank, world, tp), say)
    finally:
        if lock is not None:
            lock.release()


def _init_roles(cfg: BuildConfig, dist: Dist, store: TeacherStore, ckpt: Path, roles: list[str], layers: dict[str, list[int]], family,
                ncfg: dict, L: int, samples: list[Sample]) -> None:
    """Rank 0 creates (or checks) the role groups of one checkpoint with their build metadata and
    signal settings; a refusal (other settings, no --overwrite) stops every rank with its message."""
    ids = [s.id for s in samples]
    meta_common = {
        "family": family.name,
        "teacher_path": str(ckpt),
        "checkpoint_fingerprint": checkpoint_fingerprint(ckpt),
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
    if dist.rank == 0:
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
        except OSError as e:  # a full or read-only disk before any sample is written
            refusal = str(_startup_error(e, cfg.out))
    if dist.world > 1:
        from torch.distributed import broadcast_object_list

        box = [refusal]
        broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise StoreError(refusal)
    dist.barrier()


def _startup_error(e: OSError, out: Path) -> DriveKDError:
    return file_write_error(e, Path(e.filename or out), "the teacher store", "Free space there or make it writable (or pass another "
                            "--out), then run the same `drivekd-cache build` again")


def _nonfinite_error(e: NonFiniteTargets, ckpt: Path) -> StoreError:
    return StoreError(f"{e} from teacher {ckpt}: the sample is not stored. Check the checkpoint (a NaN weight, or an "
                      "overflow in --dtype float16: try bfloat16 or float32), or pass --skip-nonfinite to record such samples "
                      "as skipped (`drivekd-cache info` lists them) and go on")


def _build_locked(cfg: BuildConfig, dist: Dist, layers: dict[str, list[int]], depth: dict[str, int], topo: Topology,
                  say: Callable[[str], None] | None = None) -> dict:
    rank, world = dist.rank, dist.world
    samples = load_samples(cfg.data, cfg.images, check_images=False, allow_outside_images=cfg.allow_outside_images)
    try:
        store = TeacherStore(cfg.out, mode="a") if rank == 0 else None
    except OSError as e:
        raise _startup_error(e, cfg.out) from None
    dist.barrier()
    store = store or TeacherStore(cfg.out, mode="a")

    # Roles that name the same checkpoint share one forward pass.
    by_ckpt: dict[Path, list[str]] = {}
    for role in ROLES:
        if role in cfg.teachers:
            by_ckpt.setdefault(Path(cfg.teachers[role]).resolve(), []).append(role)

    fault = fault_hook()
    totals = {"written": 0, "skipped": 0, "already": 0, "bytes": 0, "seconds": 0.0, "loop_seconds": 0.0}
    nonfinite: dict[str, str] = {}  # sample id -> reason, skipped by --skip-nonfinite
    t0 = time.perf_counter()
    for ckpt, roles in by_ckpt.items():
        family = Family.from_pretrained(ckpt, image_processing=cfg.image_processing, text_tokens=cfg.text_tokens)
        ncfg = json.loads((ckpt / "config.json").read_text())
        L = depth[roles[0]]
        _init_roles(cfg, dist, store, ckpt, roles, {r: layers[r] for r in roles}, family, ncfg, L, samples)
        wanted = {r: tuple(n for n in EXTRA if n in store.role_meta(r).get("signals", {})) for r in roles}

        union = sorted(set().union(*(layers[r] for r in roles)))
        # Units of work, fixed by the dataset order whatever is already stored: image groups when
        # sharing prefixes (a group's prefix runs once), else fixed batches.
        units = image_groups(samples) if cfg.share_prefix else [samples[i : i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
        mine = [u for k, u in enumerate(units) if k % topo.dp == topo.dp_rank]  # this rank's teacher replica's share
        todo = [u for u in mine if not all(store.is_done(r, s.id, wanted[r]) for s in u for r in roles)]
        totals["already"] += sum(len(u) for u in mine) - sum(len(u) for u in todo)
        if not todo:
            continue
        dtype = getattr(torch, cfg.dtype)
        model = load_teacher(ckpt, dtype=dtype, device=dist.device, mode=cfg.teacher_parallel, topo=topo, device_map=cfg.device_map).eval()
        if topo.tp > 1 and say is not None and rank == 0:
            say(f"teacher {ckpt.name} sharded over {topo.tp} ranks ({topo.dp} replica(s)): {rank_parameters(model)} parameters "
                "on each rank (`--dry-run --teacher-parallel tp --nproc N` plans this)")
        bar = tqdm(total=sum(len(u) for u in todo), desc=f"teacher {'+'.join(roles)}", unit="sample",
                   disable=not cfg.progress or rank != 0, dynamic_ncols=True)
        t_loop = time.perf_counter()
        pass_ = _Pass(store, family, model, roles, layers, union, cfg, fault, totals, bar, wanted,
                      vocab_identity(family.tokenizer)["tokenizer_size"], writes=topo.writer, device=input_device(model, dist.device))
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
        except NonFiniteTargets as e:  # without --skip-nonfinite: stop, naming the sample and role
            raise _nonfinite_error(e, ckpt) from None
        except OSError as e:
            # A failed write never reaches its sample's completion mark: it stays "writing" and
            # the next build redoes it. Say what failed and how much room the rest needs.
            left = sum(len(u) for u in todo) - totals["written"] - totals["skipped"]
            raise write_error(e, store, roles, left) from None
        totals["loop_seconds"] += time.perf_counter() - t_loop  # teacher pass after the model loaded
        bar.close()
        nonfinite.update(pass_.nonfinite)
    dist.barrier()
    totals["seconds"] = time.perf_counter() - t0
    # Counted per sample (a sample skipped for one role is not written whole).
    totals["written"] -= len(nonfinite)
    totals["skipped"] += len(nonfinite)
    totals["nonfinite"] = len(nonfinite)
    if world > 1:
        # Each sample once: a tensor-parallel group's ranks all ran its samples, its writer counts them.
        counts = [totals["written"], totals["skipped"], totals["already"]] if topo.writer else [0, 0, 0]
        t = dist.sum_(torch.tensor(counts, dtype=torch.float64, device=dist.device))
        totals["written"], totals["skipped"], totals["already"] = (int(x) for x in t.tolist())
    summaries = {r: store.summary(r) for r in ROLES if r in cfg.teachers} if rank == 0 else {}
    return {"rank": rank, "world": world, **totals, "roles": summaries}
