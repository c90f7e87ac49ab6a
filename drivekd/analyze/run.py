"""The analysis pass: one forward per sampled question, per-sample results on disk, then the four
pre-studies, the figures and the suggested layers.

Same model loading (`load_model`, capture on), inputs (`Family.build_inputs`, prompt + reference
answer) and attention capture (`capture_attention`) as the teacher pass, so a layer chosen here
means the same layer there.

Resumable per sample: each sample's results go to `samples/<id>.pt`, written to a temporary file
and renamed (atomic), so a killed run leaves only whole files and a rerun computes only what is
missing. `run.json` records the model, data and settings the partial results belong to; a rerun
with others stops (or starts over with --overwrite). Under torchrun, rank r takes the image groups
g with g % world == r (as the teacher pass splits its units); rank 0 aggregates after all finish.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from drivekd.analyze import aggregate, figures
from drivekd.analyze.measure import CONFIDENCE_FIELDS, TOPK, measure_sample
from drivekd.analyze.sampling import REWORDING_FIELD, select
from drivekd.analyze.settings import AnalyzeConfig
from drivekd.data.loaders import load_samples
from drivekd.errors import ConfigError, DataError, DriveKDError, ModelError
from drivekd.fileio import atomic_write
from drivekd.families.base import Family, detect_family, load_model
from drivekd.distributed import barrier as _barrier
from drivekd.distributed import fault_hook as _fault_hook
from drivekd.distributed import rank_world as _dist
from drivekd.store.format import checkpoint_fingerprint
from drivekd.teacher.build import dataset_fingerprint

FORMAT_VERSION = 1
MANIFEST = "run.json"
PARTS = "samples"

DEFINITIONS = {
    "layers": "hidden-state index l = 0..L: 0 = embeddings, l = output of decoder layer l-1 (the paper's 'Layer l'; "
              "transformers' output_hidden_states, the last after the final norm). Attention index k = 0..L-1 = decoder "
              "layer k (HF layer_idx, the index drivekd-train --layers takes).",
    "adjacent": "adjacent[l-1], l = 1..L: mean over questions of the mean over all positions t of cos(h^l_t, h^(l-1)_t)",
    "vision_text": "vision_text[l], l = 0..L: mean over questions of cos(mean over vision positions of h^l, mean over text "
                   "positions (no specials) of h^l)",
    "intra_consistency": "per capability and layer: per image group, the mean of the last text token's hidden state over "
                         "that group's questions of the capability; the mean cosine over pairs of groups",
    "dispersion.hidden": "per layer: per image group with >= 2 questions, the mean over question pairs of 1 - cos of the "
                         "last text token's hidden state (the last answer token, specials excluded); mean over groups",
    "dispersion.attention": "per decoder layer k: the same 1 - cos on each question's head-mean attention from its own "
                            "question+answer text tokens onto the shared prefix block (system and image tokens, up to "
                            "the last image delimiter), averaged over those query rows: a length-P profile. The P x P "
                            "block itself is identical for all questions of an image under causal attention.",
    "dispersion.rewording": f"1 - cos between a question and a rewording of it (records with `{REWORDING_FIELD}`), "
                            "mean over pairs",
    "confidence": "teacher-forced on the reference answer tokens; per temperature tau, softmax(logits / tau): "
                  "top1 = p_(1); top10_mass = sum of the 10 largest; margin = p_(1) - mean(p_(2), ..., p_(10)) "
                  "(drivekd's definition: the paper's margin formula was lost in extraction); mean over answer "
                  "tokens, then over questions",
}


def _num_layers(model_dir: Path) -> int:
    from drivekd.families.base import checkpoint_depth

    return checkpoint_depth(model_dir)[1].text




def _load_part(path: Path) -> dict | None:
    """A per-sample result, or None when it is missing or unreadable (then it is computed again)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a file from another torch version or damaged on disk: recompute it
        return None


def _check_manifest(out: Path, manifest: dict, overwrite: bool) -> None:
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if old == manifest:
            return
        differ = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if not overwrite:
            raise ConfigError(f"--out {out} holds results of another analysis (different {', '.join(differ)}); "
                              "pass a new --out, or --overwrite to discard them")
        shutil.rmtree(out / PARTS, ignore_errors=True)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))


def analyze(cfg: AnalyzeConfig) -> dict:
    """Run (or resume) the analysis; returns rank 0's summary (other ranks: {'rank': r})."""
    t0 = time.perf_counter()
    rank, world = _dist()
    try:
        detect_family(cfg.model)
    except ModelError as e:
        raise ModelError(f"--model: {e}") from None
    samples = load_samples(cfg.data, cfg.images, check_images=False, allow_outside_images=cfg.allow_outside_images)
    sel = select(samples, cfg.samples, cfg.per_image, cfg.seed, data_name=str(cfg.data))
    if not sel.groups:
        raise ConfigError(f"--data {cfg.data}: no questions to analyse")
    family = Family.from_pretrained(cfg.model)
    L = _num_layers(cfg.model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": checkpoint_fingerprint(cfg.model),
        "processor_fingerprint": family.fingerprint(),
        "data_fingerprint": dataset_fingerprint(sel.samples),
        "rewording_of": sel.rewording_of,
        "temperatures": list(cfg.temperatures),
        "dtype": cfg.dtype,
    }
    out = cfg.out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _check_manifest(out, manifest, cfg.overwrite)
    _barrier(world)

    mine = [s for k, g in enumerate(sel.groups) if k % world == rank for s in g]
    todo = [s for s in mine if _load_part(out / PARTS / f"{s.id}.pt") is None]
    done_before = len(mine) - len(todo)
    if todo:
        model = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device).eval()
        fault = _fault_hook()
        bar = tqdm(total=len(mine), initial=done_before, desc="analyze", unit="question", dynamic_ncols=True,
                   disable=not cfg.progress or rank != 0)
        for s in todo:
            try:
                rec = measure_sample(model, family, s, L, list(cfg.temperatures), cfg.device)
            except DataError as e:  # an unreadable image: the loader's advice names the cache's --skip-bad
                raise DataError(str(e).split(". Fix or remove")[0] + f". Fix or remove the file, or drop sample {s.id} "
                                f"from --data {cfg.data}") from None
            rec.update(id=s.id, capability=s.capability, rewording_of=sel.rewording_of.get(s.id))
            atomic_write(out / PARTS / f"{s.id}.pt", lambda p: torch.save(rec, p))
            bar.update(1)
            if fault:
                fault()
        bar.close()
    _barrier(world)
    if rank != 0:
        return {"rank": rank}

    records = []
    for gi, g in enumerate(sel.groups):
        for s in g:
            rec = _load_part(out / PARTS / f"{s.id}.pt")
            if rec is None:
                raise DriveKDError(f"sample {s.id}: no result in {out / PARTS}; run the same command again to finish")
            rec["group"] = gi
            records.append(rec)
    result = aggregate.analyse(records, L, list(cfg.temperatures))
    doc = {
        "format_version": FORMAT_VERSION,
        "model": str(cfg.model),
        "family": family.name,
        "num_layers": L,
        "data": str(cfg.data),
        "questions": sum(len(sel.originals(g)) for g in sel.groups),
        "rewordings": len(sel.rewording_of),
        "images": len(sel.groups),
        "sample_ids": [s.id for s in sel.samples],
        "temperatures": list(cfg.temperatures),
        "confidence_fields": list(CONFIDENCE_FIELDS),
        "top_k": TOPK,
        "definitions": DEFINITIONS,
        **result,
        "figures": figures.write_figures(result, L, out),
    }
    atomic_write(out / "analysis.json", lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
    return {"rank": 0, "out": str(out), "computed": len(todo), "already": done_before, "seconds": time.perf_counter() - t0,
            "suggestion": result["suggestion"], "figures": doc["figures"], "questions": doc["questions"],
            "rewordings": doc["rewordings"], "images": doc["images"]}
