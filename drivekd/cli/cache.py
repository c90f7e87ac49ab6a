"""drivekd-cache: build, inspect and verify teacher stores. Parses flags and calls drivekd.store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from drivekd.cli.options import image_options
from drivekd.errors import DriveKDError
from drivekd.images import ImageSettings
from drivekd.roles import ROLES


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group()
def main() -> None:
    """Run each teacher once and store its head-mean attention targets (Zarr v3)."""


@main.command()
@click.option("--teacher", "role", type=click.Choice([*ROLES, "all"]), required=True, help="Which teacher role(s) to build.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="Teacher checkpoint folder (default: [teachers].<role> in drivekd.toml).")
@click.option("--data", type=click.Path(path_type=Path), help="Training data JSON (Drive-KD, DriveBench, DriveLM or RoboSense format).")
@click.option("--images", type=click.Path(path_type=Path), help="Image root for relative paths (default: the data file's folder).")
@click.option("--allow-outside-images", is_flag=True, help="Accept image paths that escape the image root (a relative "
              "../x.jpg, or an absolute path outside --images); refused by default.")
@click.option("--out", type=click.Path(path_type=Path), help="Store folder (default: cache/).")
@click.option("--layers", help="Override the recipe layers (applies to every selected role): N, L-N, ranges A..B, "
              "comma-separated, e.g. '0', 'L-2', '0..L-2', '1,3,5'.")
@click.option("--batch-size", type=int, default=None, help="Samples per teacher forward (default 1).")
@click.option("--encoding", type=click.Choice(["lossless", "lossy"]), default=None, help="lossless fp16 (default) or mantissa-rounded.")
@click.option("--keepbits", type=int, default=None, help="Mantissa bits kept by --encoding lossy (default 7: <1% loss change in tools/bench_cache.py).")
@click.option("--skip-bad", is_flag=True, help="Record samples with missing/corrupt images as skipped instead of stopping.")
@click.option("--skip-nonfinite", is_flag=True, help="Record samples whose teacher targets hold NaN/inf as skipped (with the "
              "reason, listed by `drivekd-cache info`) instead of stopping. Either way they are never stored as complete.")
@click.option("--overwrite", is_flag=True, help="Delete a role built with other settings and rebuild it.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Teacher dtype (default bfloat16 on GPU, float32 on CPU).")
@click.option("--text-tokens", type=click.Choice(["paper", "not_vision"]), default=None,
              help="Text query set X stored for the losses: paper (no special tokens, default) or not_vision (the "
                   "reference trainer's); drivekd-train --text-tokens must match.")
# Two names: under torchrun, its own parser (which reads every option string, also those after the
# script) takes --signals for an abbreviation of its --signals-to-handle and refuses the launch.
@click.option("--signals", "--store-signals", "signals", default=None, help="What to store, comma separated, any order (under torchrun spell it --store-signals: torchrun "
              "refuses --signals as an abbreviation of its --signals-to-handle): attention (always), logits (the teacher's "
              "top-k next-token log-probabilities on answer positions, for drivekd-train --recipe kl), hidden (hidden states at the role's layers "
              "on text positions, for --recipe hidden). Adding a signal to an existing store computes only what is missing.")
@click.option("--logits-top-k", type=int, default=None, help="k of the stored top-k log-probabilities (default 256: "
              "tools/bench_signals.py measures bytes vs KL error); the rest of the mass is kept as one tail value.")
@click.option("--share-prefix/--no-share-prefix", default=True, help="Run each image group's shared token prefix once (default on).")
@click.option("--writers", type=int, default=None, help="Threads that compress and write targets (default: min(4, CPUs)).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Project config (default ./drivekd.toml if present).")
@click.option("--no-progress", is_flag=True)
@image_options
@click.option("--teacher-parallel", type=click.Choice(["none", "tp"]), default=None,
              help="tp: shard each teacher's language model over --tp-size ranks under torchrun (transformers' tensor "
                   "parallelism; the vision tower is replicated). world = data-parallel replicas x tp-size. Default none.")
@click.option("--tp-size", type=int, default=None, help="With --teacher-parallel tp: ranks per teacher replica (default: all ranks).")
@click.option("--device-map", type=click.Choice(["auto"]), default=None,
              help="auto: one process spreads the teacher's layers over every visible GPU (transformers/accelerate's "
                   "sequential split); not under torchrun, not with --teacher-parallel.")
@click.option("--nproc", type=int, default=None, help="With --dry-run --teacher-parallel tp: the ranks per teacher replica to plan "
              "for (per-rank peak: sharded layers / N + the replicated vision tower + activations).")
@click.option("--dry-run", is_flag=True, help="Plan only: peak memory and FLOPs of one teacher forward with capture, from config.json alone.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print one JSON object.")
@click.option("--seq-len", type=int, default=None, help="With --dry-run: tokens per sample (default: six cameras' image tokens + 264).")
def build(role, model_dir, data, images, allow_outside_images, out, layers, batch_size, encoding, keepbits, skip_bad, skip_nonfinite, overwrite, device, dtype, text_tokens, signals, logits_top_k,
          share_prefix, writers, config_path, no_progress, teacher_parallel=None, tp_size=None, device_map=None, nproc=None,
          dry_run=False, as_json=False, seq_len=None, **image_flags):
    """Run the teacher(s) once over every sample and write their targets."""
    import torch

    from drivekd.config import load_config
    from drivekd.teacher.build import BuildConfig, build as run_build
    from drivekd.store.signals import DEFAULT_TOP_K, parse_signals
    from drivekd.store.zarr_store import Encoding

    try:
        cfg = load_config(config_path)
        roles = list(ROLES) if role == "all" else [role]
        teachers_cfg = cfg.get("teachers", {})
        teachers = {}
        for r in roles:
            path = model_dir or teachers_cfg.get(r)
            if path is None:
                raise DriveKDError(f"no checkpoint for role {r}: pass --model DIR or set [teachers].{r} in drivekd.toml")
            teachers[r] = Path(path)
        c = cfg.get("cache", {})
        teacher_parallel = teacher_parallel or c.get("teacher_parallel", "none")
        if nproc is not None and not (dry_run and teacher_parallel == "tp"):
            raise DriveKDError("--nproc plans a tensor-parallel teacher: pass it with --dry-run --teacher-parallel tp "
                               "(a real build takes its ranks from torchrun's --nproc_per_node)")
        if dry_run:  # the planner (drivekd/planner): no data, store or weights needed
            import json

            images_ = ImageSettings.from_sources(image_flags, cfg)
            if teacher_parallel == "tp":
                from drivekd.planner.teacher_parallel import dry_run_teacher_tp, format_tp_report

                rep = dry_run_teacher_tp(teachers, layers, nproc=nproc or tp_size or 1, seq_len=seq_len, dtype=dtype or "bfloat16", images=images_)
                click.echo(json.dumps(rep, indent=2) if as_json else format_tp_report(rep))
                return
            from drivekd.planner.plan import dry_run_teacher, format_teacher_report

            rep = dry_run_teacher(teachers, layers, seq_len=seq_len, dtype=dtype or "bfloat16", images=images_)
            click.echo(json.dumps(rep, indent=2) if as_json else format_teacher_report(rep))
            return
        d = cfg.get("data", {})
        data_path = data or d.get("train")
        if data_path is None:
            raise DriveKDError("no data: pass --data FILE or set [data].train in drivekd.toml")
        dev = device or c.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        enc = Encoding(mode=encoding or c.get("encoding", "lossless"), keepbits=keepbits if keepbits is not None else c.get("keepbits", 7))
        layer_list = layers or c.get("layers")
        bc = BuildConfig(
            teachers=teachers,
            data=Path(data_path),
            images=Path(images) if images else (Path(d["images"]) if d.get("images") else None),
            out=Path(out or c.get("out", "cache")),
            layers={r: layer_list for r in roles} if layer_list else None,
            batch_size=batch_size or c.get("batch_size", 1),
            encoding=enc,
            skip_bad=skip_bad or bool(c.get("skip_bad", False)),
            skip_nonfinite=skip_nonfinite or bool(c.get("skip_nonfinite", False)),
            allow_outside_images=allow_outside_images,
            overwrite=overwrite,
            device=dev,
            dtype=dtype or c.get("dtype") or ("bfloat16" if dev.startswith("cuda") else "float32"),
            progress=not no_progress,
            share_prefix=share_prefix and bool(c.get("share_prefix", True)),
            text_tokens=text_tokens or c.get("text_tokens", "paper"),
            image_processing=ImageSettings.from_sources(image_flags, cfg),
            signals=parse_signals(signals or c.get("signals")),
            logits_top_k=logits_top_k or int(c.get("logits_top_k", DEFAULT_TOP_K)),
            teacher_parallel=teacher_parallel,
            tp_size=tp_size or c.get("tp_size"),
            device_map=device_map or c.get("device_map"),
        )
        if writers or c.get("writers"):
            bc.writers = writers or int(c["writers"])
        res = run_build(bc, say=lambda line: click.echo(f"drivekd-cache: {line}"))
    except DriveKDError as e:
        _fail(e)
    if res["rank"] == 0:
        parts = [f"{res['written']} samples written", f"{res['already']} already complete", f"{res['skipped']} skipped"]
        click.echo(f"drivekd-cache: {', '.join(parts)} in {res['seconds']:.1f} s -> {bc.out}")
        for r, s in res["roles"].items():
            ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "n/a"
            click.echo(f"  {r}: {s['complete']} complete, {s['skipped']} skipped, {s['missing'] + s['incomplete']} missing; "
                       f"{s['bytes_on_disk'] / 2**20:.2f} MiB on disk, {ratio} smaller than fp16 square maps")
            if s["skipped_ids"]:
                click.echo(f"  {r} skipped ids: {', '.join(s['skipped_ids'])}")
            if s["skipped"] and not s["complete"]:
                click.echo(f"warning: every {r} sample was skipped ({_first_reason(s)}): this role holds no targets", err=True)


def _first_reason(s: dict) -> str:
    sid, why = next(iter(s["skipped_reasons"].items()))
    return f"e.g. {sid}: {why}"


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(store, as_json):
    """Roles, teacher, layers, sample counts, bytes on disk, compression ratio."""
    from drivekd.store.zarr_store import TeacherStore

    try:
        st = TeacherStore(store)
        summaries = {r: st.summary(r) for r in st.roles()}
    except DriveKDError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    if not summaries:
        click.echo(f"{store}: no roles built yet")
    elif not st.checksummed:
        click.echo("note: " + NO_CHECKSUMS.format(store=store, v=st.schema_version))
    for r, s in summaries.items():
        ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "n/a"
        click.echo(f"{r}: teacher {s['teacher']} ({s['family']}, {s['checkpoint_fingerprint']}), layers {s['layers']}, encoding {s['encoding']['mode']}, "
                   f"schema {s['schema_version']} ({'crc32c checksums' if s['checksums'] else 'no checksums'})")
        click.echo(f"  samples: {s['complete']} complete, {s['incomplete'] + s['missing']} missing/incomplete, {s['skipped']} skipped")
        for sid, why in s["skipped_reasons"].items():
            click.echo(f"    skipped {sid}: {why}")
        if s["orphans"]:
            click.echo(f"  {len(s['orphans'])} orphan sample(s) on disk, not in the last build's data: {_ids(s['orphans'])} "
                       "(`drivekd-cache verify --drop-orphans` removes them)")
        click.echo(f"  {s['bytes_on_disk'] / 2**20:.2f} MiB on disk; attention {s['attn_bytes'] / 2**20:.2f} MiB vs "
                   f"{s['fp16_square_bytes'] / 2**20:.2f} MiB as fp16 square maps ({ratio})")
        for name, st in s.get("signals", {}).items():
            what = f"top {st['top_k']} log-probs + tail on answer positions" if name == "logits" else f"layers {st['layers']} on text positions"
            click.echo(f"  {name}: {what}; {s['signal_bytes'].get(name, 0) / 2**20:.2f} MiB on disk")
        if s["prefix_groups"]:
            click.echo(f"  shared prefixes: {s['prefix_groups']} groups, {s['questions_per_group']:.1f} questions per group, "
                       f"{s['unshared_samples']} unshared samples; {s['bytes_saved_by_sharing'] / 2**20:.2f} MiB of fp16 "
                       f"lower triangles not stored ({100 * s['bytes_saved_by_sharing'] / max(1, s['tril_fp16_bytes']):.0f}%)")


def _ids(ids: list[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f" ... and {len(ids) - n} more" if len(ids) > n else "")


NO_CHECKSUMS = ("{store} is a schema-{v} store: its samples carry no checksums, so damaged content cannot be detected "
                "(a missing attention chunk still is). To get them, rebuild it with this drivekd into a new --out")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Check completeness and that every file exists, without reading the arrays.")
@click.option("--repair", is_flag=True, help="Delete the damaged samples found (and damaged shared prefixes) so that the next build redoes them.")
@click.option("--drop-orphans", is_flag=True, help="Delete the orphans: samples on disk that the last build's data no longer lists "
              "(damaged orphans are problems, removed by --repair too).")
def verify(store, quick, repair, drop_orphans):
    """Check every sample on disk (orphans too) is complete, finite and matches the checksums
    written with it; non-zero exit naming what is wrong."""
    from drivekd.store.lock import StoreLock
    from drivekd.store.zarr_store import TeacherStore

    try:
        st = TeacherStore(store)
        roles = st.roles()
        if not roles:
            raise DriveKDError(f"{store}: no roles built")
        if not st.checksummed:
            click.echo("note: " + NO_CHECKSUMS.format(store=store, v=st.schema_version), err=True)
        # --repair deletes samples: it must not race a build writing them.
        lock = StoreLock(store, roles).acquire() if repair or drop_orphans else None
        try:
            problems = [p for r in roles for p in st.verify(r, quick=quick)]
            orphans = {r: st.orphans(r) for r in roles}
            removed = st.repair(problems if repair else [], roles if drop_orphans else []) if repair or drop_orphans else []
        finally:
            if lock is not None:
                lock.release()
    except DriveKDError as e:
        _fail(e)
    for r, ids in orphans.items():
        if ids:
            what = "removed" if drop_orphans else "checked too; `--drop-orphans` removes them"
            click.echo(f"note: {r}: {len(ids)} orphan sample(s) on disk, not in the last build's data: {_ids(ids)} ({what})", err=True)
    if problems:
        for p in problems[:50]:
            click.echo(f"problem: {p}", err=True)
        if len(problems) > 50:
            click.echo(f"... and {len(problems) - 50} more", err=True)
        click.echo(f"verify: {len(problems)} problem(s) in {store}", err=True)
        if repair or drop_orphans:
            click.echo(f"repair: removed {len(removed)} sample/prefix group(s); run the same `drivekd-cache build` "
                       "again to rebuild them", err=True)
        else:
            click.echo("fix: `drivekd-cache verify --repair` removes the damaged samples, then `drivekd-cache build` "
                       "(same flags) rebuilds them; incomplete ones need only the build", err=True)
        sys.exit(1)
    how = "files present (--quick: content not read)" if quick else ("content matches its checksums and is finite" if st.checksummed else "readable, finite")
    click.echo(f"verify: {store} OK ({', '.join(roles)}; {how})")


if __name__ == "__main__":
    main()
