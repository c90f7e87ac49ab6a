"""Size of the logits and hidden-state signals, and the KL error of the stored top-k, measured.

    PYTHONPATH=. .venv/bin/python tools/bench_signals.py [--work DIR] [--json OUT]

On the demo data (tiny InternVL teacher and student, 12 synthetic samples):
 1. choosing --logits-top-k: for k = 4 .. 256, bytes per answer position (raw and compressed as
    stored: Blosc zstd level 1, byte-shuffle) against the relative error of the stored top-k KL
    (drivekd.losses.kl.topk_kl: k + 1 buckets, fp16 log-probs) versus the full-vocabulary KL
    between the same teacher and student, at tau = 1 and tau = 2. The demo teacher has random
    weights and an almost flat distribution (top-1 ~ 1/300), the worst case for a top-k; a second
    row set uses the same logits scaled until the mean top-1 probability is 0.5 ("peaked proxy",
    closer to a trained LM; a proxy, not a trained teacher);
 2. store bytes per sample added by logits (default k) and by hidden states, next to attention,
    from a real `drivekd-cache build` (attention first, then `--signals logits,hidden` added);
 3. projection for an InternVL3-8B teacher (configs/models/InternVL3-8B-hf) over 10k samples with
    T ~ 1800 (six 448-px cameras: 6 x 256 vision tokens, 200 answer tokens).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KS = (4, 8, 16, 32, 64, 128, 256)


def _blosc_bytes(a: np.ndarray) -> int:
    from numcodecs import Blosc

    return len(Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE).encode(np.ascontiguousarray(a)))


def _answer_logits(models: Path, data: Path):
    """(teacher logits, student logits) at every answer position of the demo data: (N, V) each."""
    from drivekd.data import load_samples
    from drivekd.families import Family, load_model
    from drivekd.store.signals import answer_rows

    out = []
    for name in ("internvl-teacher", "internvl-student"):
        fam = Family.from_pretrained(models / name)
        model = load_model(models / name).eval()
        rows = []
        for s in load_samples(data):
            inputs = fam.build_inputs([s])
            with torch.no_grad():
                logits = model(**inputs.tensors).logits[0]
            rows.append(logits[answer_rows(inputs.layouts[0].labels)].double())
        out.append(torch.cat(rows))
    return out[0], out[1], fam.tokenizer


def _kl_error(z_t: torch.Tensor, z_s: torch.Tensor, n_tok: int, k: int, tau: float) -> float:
    from drivekd.losses.kl import topk_kl
    from drivekd.store.signals import topk_logits

    p_t = torch.softmax(z_t / tau, -1)
    full = (tau * tau * (p_t * (torch.log_softmax(z_t / tau, -1) - torch.log_softmax(z_s / tau, -1))).sum(-1)).mean().item()
    lp, idx, tail = (torch.from_numpy(a) for a in topk_logits(z_t, k, n_tok))  # as stored: fp16 log-probs at tau = 1
    mask = torch.ones(1, z_t.shape[0], dtype=torch.bool)
    got = topk_kl(z_s[None], lp[None].double(), idx[None].long(), tail[None].double(), mask, tau).item()
    return abs(got - full) / full


def measure_k(z_t, z_s, n_tok) -> list[dict]:
    from drivekd.store.signals import topk_logits

    # Peaked proxy: the same logits scaled until the mean top-1 probability is 0.5.
    lo, hi = 1.0, 1e4
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        top1 = torch.softmax(z_t * mid, -1).max(-1).values.mean().item()
        lo, hi = (mid, hi) if top1 < 0.5 else (lo, mid)
    rows = []
    for label, zt in (("demo teacher", z_t), (f"peaked proxy (logits x {lo:.0f})", z_t * lo)):
        top1 = torch.softmax(zt, -1).max(-1).values.mean().item()
        for k in KS:
            lp, idx, tail = topk_logits(zt, k, n_tok)
            A = zt.shape[0]
            raw = (lp.nbytes + idx.nbytes + tail.nbytes + 4 * A) / A
            packed = (_blosc_bytes(lp) + _blosc_bytes(idx) + _blosc_bytes(tail) + _blosc_bytes(np.arange(A, dtype=np.int32))) / A
            rows.append({"teacher": label, "top1": top1, "k": k, "bytes_per_position_raw": raw, "bytes_per_position_stored": packed,
                         "tail_mass": float(np.exp(tail).mean()),
                         "kl_rel_error_tau1": _kl_error(zt, z_s, n_tok, k, 1.0), "kl_rel_error_tau2": _kl_error(zt, z_s, n_tok, k, 2.0)})
    return rows


def _du(paths) -> int:
    return sum(f.stat().st_size for p in paths for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())


def measure_store(models: Path, data: Path, work: Path) -> dict:
    import zarr

    from drivekd.teacher.build import BuildConfig, build
    from drivekd.store import TeacherStore

    out = work / "store"
    shutil.rmtree(out, ignore_errors=True)
    t = models / "internvl-teacher"
    teachers = {r: t for r in ("perception", "reasoning", "planning")}
    build(BuildConfig(teachers=teachers, data=data, images=None, out=out, progress=False))
    attn_before = {p: p.stat().st_mtime_ns for p in out.rglob("attn/c/*/0")}
    build(BuildConfig(teachers=teachers, data=data, images=None, out=out, progress=False, signals=("logits", "hidden")))
    assert attn_before == {p: p.stat().st_mtime_ns for p in out.rglob("attn/c/*/0")}, "attention files were rewritten"
    st = TeacherStore(out)
    res = {}
    for role in st.roles():
        sdirs = [d for d in (out / role / "samples").iterdir() if d.is_dir()]
        n = len(sdirs)
        A = sum(zarr.open_array(str(d / "logits_pos"), mode="r").shape[0] for d in sdirs)  # answer positions
        X = sum(zarr.open_array(str(d / "hidden_pos"), mode="r").shape[0] for d in sdirs)  # text positions
        nl = len(st.role_meta(role)["layers"])
        H = st.role_meta(role)["signals"]["hidden"]["hidden_size"]
        logits_b = _du([d / k for d in sdirs for k in ("logits_pos", "logits_lp", "logits_idx", "logits_tail")])
        hidden_b = _du([d / k for d in sdirs for k in ("hidden_pos", "hidden")])
        s = st.summary(role)
        res[role] = {"samples": n, "layers": nl, "answer_positions_per_sample": A / n, "text_positions_per_sample": X / n,
                     "attention_bytes_per_sample": s["attn_bytes"] / n, "logits_bytes_per_sample": logits_b / n,
                     "hidden_bytes_per_sample": hidden_b / n, "logits_bytes_per_position": logits_b / A,
                     "hidden_compression": (X * nl * H * 2) / _du([d / "hidden" for d in sdirs])}
    return res


def project_8b(k: int, hidden_ratio: float, logits_ratio: float) -> dict:
    cfg = json.loads((ROOT / "configs" / "models" / "InternVL3-8B-hf" / "config.json").read_text())["text_config"]
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    T, vision, A = 1800, 6 * 256, 200
    X = T - vision - 22  # text positions: minus 12 image delimiters and ~10 chat-template specials
    n = 10_000
    layers = {"perception": 1, "reasoning": L - 1, "planning": 1}  # 0; 0..L-2; L-2
    logits_raw = A * (6 * k + 8)
    out = {"hidden_size": H, "num_layers": L, "T": T, "text_positions": X, "answer_positions": A, "samples": n, "top_k": k,
           "logits_bytes_per_sample_raw": logits_raw, "logits_total_raw_GB_per_role": logits_raw * n / 1e9,
           "logits_total_stored_GB_per_role_at_demo_ratio": logits_raw * n / logits_ratio / 1e9}
    for role, nl in layers.items():
        raw = X * H * 2 * nl
        out[f"hidden_{role}_bytes_per_sample_raw"] = raw
        out[f"hidden_{role}_total_raw_GB"] = raw * n / 1e9
        out[f"hidden_{role}_total_stored_GB_at_demo_ratio"] = raw * n / hidden_ratio / 1e9
        out[f"hidden_{role}_all_positions_total_raw_GB"] = T * H * 2 * nl * n / 1e9
    return out


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Scratch folder (default: a temporary one).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON.")
def main(work, json_out):
    torch.set_num_threads(1)
    from drivekd.demo.scenes import make_demo_data
    from drivekd.demo.tiny_models import make_tiny_models
    from drivekd.store.signals import DEFAULT_TOP_K, vocab_identity

    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "models").exists():
        make_tiny_models(work / "models", families=("internvl",))
        make_demo_data(work / "demo", groups=4, questions_per_group=3, seed=0)
    data = work / "demo" / "train.json"
    z_t, z_s, tok = _answer_logits(work / "models", data)
    n_tok = vocab_identity(tok)["tokenizer_size"]
    ks = measure_k(z_t, z_s, n_tok)
    print(f"1. top-k choice ({z_t.shape[0]} answer positions, vocabulary {z_t.shape[1]} rows, {n_tok} token ids)")
    print(f"   {'teacher':34s} {'top1':>5s} {'k':>4s} {'B/pos raw':>9s} {'B/pos stored':>12s} {'tail mass':>9s} {'KL err t=1':>10s} {'KL err t=2':>10s}")
    for r in ks:
        print(f"   {r['teacher']:34s} {r['top1']:5.3f} {r['k']:4d} {r['bytes_per_position_raw']:9.0f} {r['bytes_per_position_stored']:12.0f} "
              f"{r['tail_mass']:9.3f} {r['kl_rel_error_tau1']:10.2%} {r['kl_rel_error_tau2']:10.2%}")
    store = measure_store(work / "models", data, work)
    print("2. store bytes per sample on the demo data (InternVL tiny teacher: hidden 96, 6 layers)")
    for role, s in store.items():
        print(f"   {role:10s} layers {s['layers']}: attention {s['attention_bytes_per_sample'] / 1024:.1f} KiB, + logits "
              f"{s['logits_bytes_per_sample'] / 1024:.1f} KiB ({s['answer_positions_per_sample']:.0f} answer positions, "
              f"{s['logits_bytes_per_position']:.0f} B each), + hidden {s['hidden_bytes_per_sample'] / 1024:.1f} KiB "
              f"({s['text_positions_per_sample']:.0f} text positions, compression {s['hidden_compression']:.2f}x)")
    demo_logits_ratio = next(r["bytes_per_position_raw"] / r["bytes_per_position_stored"] for r in ks if r["k"] == DEFAULT_TOP_K)
    proj = project_8b(DEFAULT_TOP_K, store["reasoning"]["hidden_compression"], demo_logits_ratio)
    print(f"3. InternVL3-8B teacher (hidden {proj['hidden_size']}, {proj['num_layers']} layers), {proj['samples']} samples, T = {proj['T']}, "
          f"{proj['text_positions']} text / {proj['answer_positions']} answer positions, k = {proj['top_k']}")
    print(f"   logits: {proj['logits_bytes_per_sample_raw'] / 1024:.0f} KiB/sample raw, {proj['logits_total_raw_GB_per_role']:.2f} GB per role "
          f"({proj['logits_total_stored_GB_per_role_at_demo_ratio']:.2f} GB at the demo's compression)")
    for role in ("perception", "reasoning", "planning"):
        print(f"   hidden {role:10s}: {proj[f'hidden_{role}_bytes_per_sample_raw'] / 2**20:.1f} MiB/sample raw, "
              f"{proj[f'hidden_{role}_total_raw_GB']:.1f} GB ({proj[f'hidden_{role}_total_stored_GB_at_demo_ratio']:.1f} GB at the demo's "
              f"compression); all {proj['T']} positions would be {proj[f'hidden_{role}_all_positions_total_raw_GB']:.0f} GB")
    if json_out:
        Path(json_out).write_text(json.dumps({"top_k": ks, "store": store, "internvl3_8b": proj}, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
