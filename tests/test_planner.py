"""The run planner (`drivekd-train --dry-run`): the fake-tensor count is the real step's count.

Proofs, as issue 18 asks: on the tiny models the dry run's peak equals the same step on real
tensors counted by the same tracker (within 5%; it is exact), and is within 15% of the measured
RSS increase; weights, gradients, per-loss rows and optimizer state are parameter count x bytes
exactly; a real-size config (InternVL3-1B, T = 1800) runs through the CLI; the planned T is the one
the family's processor path gives under the run's image settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from drivekd.images import ImageSettings
from drivekd.planner import plan as P
from drivekd.trainer.plan import student_depth
from drivekd.trainer.settings import TrainConfig
from conftest import config_copy

ROOT = Path(__file__).resolve().parents[1]


CONFIGS = ROOT / "configs" / "models"
# The tiny Qwen's processor allows 1024 tokens per image (966 for a 1600x900 camera); these cap it at
# 64 (50 per camera: a dozen vision windows each) and 16 (10 per camera: a few windows). A fake count's
# cost is its ops, and Qwen's window attention is one attention per window: fewer windows, fewer ops,
# the same per-layer and per-camera structure.
QWEN_64 = ImageSettings(max_pixels=28 * 28 * 64)
QWEN_SMALL = ImageSettings(max_pixels=28 * 28 * 16)


def _count(student: Path, fake: bool, T: int, cameras: int = 6, **kw) -> P.Counted:
    cfg = TrainConfig(student=student, **{"dtype": "float32", **kw})
    family, L = student_depth(student)
    config = P.student_config(student)
    shapes = P.shapes_for(family, config, student, cameras, T, cfg.image_settings)
    return P.count_step(cfg, P.dry_plan(cfg, L, family), shapes, config, fake=fake)


@pytest.fixture(scope="module")
def counted():
    """_count, each fake count done once per module: a count is seconds of per-op fake-tensor work, and
    several tests ask the same one (the tests only read the Counted)."""
    seen: dict[str, P.Counted] = {}

    def count(student: Path, T: int, cameras: int = 6, **kw) -> P.Counted:
        key = repr((str(student), T, cameras, sorted(kw.items())))
        if key not in seen:
            seen[key] = _count(student, True, T, cameras, **kw)
        return seen[key]

    return count


@pytest.fixture(scope="module")
def shallow(tiny_models, tmp_path_factory) -> Path:
    """A two-text-layer, one-vision-layer copy of the tiny InternVL student's config (no weights): for
    the counts whose point is per parameter or per category, not per layer (a count's cost is its ops)."""
    return config_copy(tiny_models / "internvl-student", tmp_path_factory.mktemp("shallow") / "internvl", text=2, vision=1)


@pytest.mark.parametrize("family", ["internvl", pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def test_fake_peak_equals_real_step(tiny_models, one_thread, counted, family):
    """Same step, same tracker: fake tensors predict the real tensors' peak and categories."""
    student = tiny_models / f"{family}-student"
    # the tiny Qwen's cameras take 50 tokens each under QWEN_64: three of them (its vision windows are
    # per camera), at T = 512 (was 231 tokens at T = 1024: measured 10 -> 5 CPU s for the Qwen case)
    T, cameras = (1024, 6) if family == "internvl" else (512, 3)
    images = QWEN_64 if family == "qwen2_5_vl" else ImageSettings()
    fake = counted(student, T, cameras=cameras, recipe="multi", projection="agp", image_settings=images)
    real = _count(student, False, T, cameras=cameras, recipe="multi", projection="agp", image_settings=images)
    assert abs(fake.peak - real.peak) <= 0.05 * real.peak, (fake.peak, real.peak)
    assert fake.categories == real.categories  # exact in practice: same ops, same sizes
    assert fake.flops == real.flops
    # The capture's maps, the targets and the saved activations are counted (not all "temporaries").
    assert real.categories["maps"] > 0 and real.categories["teacher_targets"] > 0 and real.categories["activations"] > 0


@pytest.mark.slow
def test_fake_peak_near_measured_rss(tiny_models):
    """The tracked increase over the step is within 15% of the process's peak RSS increase.

    Measured in a fresh process with malloc's mmap threshold fixed at 64 KiB so freed blocks go back
    to the OS (with glibc's default dynamic threshold, freed heap blocks stay resident and RSS
    overstates live memory by fragmentation). The rest (~5%) is what no tensor op allocates: the
    CPU kernels' scratch buffers (oneDNN/BLAS workspaces, softmax and sdpa buffers), the
    interpreter's objects, page rounding."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from drivekd.planner import plan as P\n"
        "from drivekd.trainer.plan import student_depth\n"
        "from drivekd.trainer.settings import TrainConfig\n"
        f"s = Path({str(tiny_models / 'internvl-student')!r})\n"
        "cfg = TrainConfig(student=s, dtype='float32', recipe='multi')\n"
        "fam, L = student_depth(s); conf = P.student_config(s); sh = P.shapes_for(fam, conf, s, 6, 2048)\n"
        "c = P.count_step(cfg, P.dry_plan(cfg, L, fam), sh, conf, fake=False)\n"
        "print(json.dumps({'tracked': c.peak - c.baseline, 'rss': c.rss_increase}))\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["tracked"] > 200e6  # the step's own memory dominates what is measured
    assert abs(got["rss"] - got["tracked"]) <= 0.15 * got["rss"], got


@pytest.mark.parametrize("rows_dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_persistent_categories_are_param_count_times_bytes(shallow, one_thread, rows_dtype):
    student = shallow
    c = _count(student, True, 512, recipe="multi", projection="agp", grad_buffer_dtype=rows_dtype)
    model_params = list(P.build_student(student, "internvl", P.student_config(student)).parameters())
    N, n_tensors = sum(p.numel() for p in model_params), len(model_params)
    assert c.params == N
    assert c.categories["weights"] == 4 * N
    assert c.categories["gradients"] == 4 * N  # the flat fp32 gradient
    assert c.categories["grad_rows"] == 4 * N * (4 if rows_dtype == "float32" else 2)  # K = 4 rows: CE + 3 teachers
    # AdamW: exp_avg and exp_avg_sq in fp32, plus one fp32 `step` scalar per parameter tensor.
    assert c.categories["optimizer_state"] == 8 * N + 4 * n_tensors
    assert sum(c.categories.values()) == c.peak


@pytest.mark.parametrize("precision,state_bytes", [("bf16-kahan", 6), ("bf16-stochastic", 4), ("bf16-offload", 0)])
@pytest.mark.slow
def test_precision_bytes_per_parameter(shallow, one_thread, counted, precision, state_bytes):
    """--precision bf16-*: bf16 weights and flat gradient (2 + 2 bytes/parameter), BF16AdamW's state
    on the device (kahan: two bf16 moments + bf16 compensation; stochastic: the moments; offload:
    none), and offload's fp32 masters + their gradients + fp32 AdamW state (16 bytes/parameter, plus
    the host step's temporaries) counted as host memory, apart from the device peak."""
    student = shallow
    c = _count(student, True, 512, recipe="multi", projection="agp", grad_engine="gram", precision=precision,
               dtype="bfloat16")
    N = c.params
    assert c.categories["weights"] == 2 * N and c.categories["gradients"] == 2 * N
    assert c.categories["optimizer_state"] == state_bytes * N
    assert sum(c.categories.values()) == c.peak
    if precision == "bf16-offload":
        assert 16 * N <= c.host_peak <= 24 * N
        real = _count(student, False, 512, recipe="multi", projection="agp", grad_engine="gram", precision=precision,
                      dtype="bfloat16")
        assert (real.categories, real.host_peak) == (c.categories, c.host_peak)  # fake tensors predict the real run
    else:
        assert c.host_peak == 0
    fp32 = counted(student, 512, recipe="multi", projection="agp", grad_engine="gram")  # the same for each mode
    assert fp32.host_peak == 0 and fp32.peak - c.peak >= (20 - 4 - state_bytes) * N


@pytest.mark.slow
def test_sft_has_no_rows_and_fewer_flops(tiny_models, one_thread, counted):
    student = tiny_models / "internvl-student"
    multi = counted(student, 1024, recipe="multi", projection="agp", image_settings=ImageSettings())  # as test_fake_peak_...
    sft_cfg = P.sft_config(TrainConfig(student=student, dtype="float32"))
    family, L = student_depth(student)
    conf = P.student_config(student)
    sft = P.count_step(sft_cfg, P.dry_plan(sft_cfg, L, family), P.shapes_for(family, conf, student, 6, 1024), conf)
    assert sft.categories["grad_rows"] == 0 and sft.categories["maps"] == 0 and sft.categories["teacher_targets"] == 0
    assert sft.flops < multi.flops and sft.peak < multi.peak


@pytest.fixture(scope="module")
def not_fitting(shallow, one_thread):
    """One dry run that does not fit (a perception run on the two-layer copy, one camera, a 1 MiB
    GPU): the run, its SFT pass and seven suggestions, nine counts, each kept with the config it
    counted. Shared: the suggestions test reads the report, the checkpointing test two of its counts.
    (One camera at T = 512, not six at 1024: the suggestions' order does not depend on it, and a
    count's cost is mostly its ops: measured 12.4 -> 10.5 CPU s.)"""
    cfg = TrainConfig(student=shallow, recipe="perception", dtype="float32", grad_engine="rows")
    counts: list[tuple[TrainConfig, P.Counted]] = []
    real = P.count_at_depth

    def recording(c, *a, **k):
        counts.append((c, real(c, *a, **k)))
        return counts[-1][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "count_at_depth", recording)
        r = P.dry_run(cfg, seq_len=512, cameras=1, gpu_memory=1 << 20)
    return cfg, r, counts


@pytest.mark.slow
def test_gradient_checkpointing_lowers_planned_activations(not_fitting):
    cfg, _, counts = not_fitting
    (off,) = [c for k, c in counts if k == cfg]  # the run
    (on,) = [c for k, c in counts if k == replace(cfg, gradient_checkpointing=True)]  # its first suggestion
    assert on.categories["activations"] < off.categories["activations"]
    assert on.flops > off.flops  # the recomputed forward


@pytest.mark.slow
def test_real_size_dry_run_json(one_thread, monkeypatch):
    """InternVL3-1B, six cameras of one 448-px tile (--no-tiling), T = 1800, multi + AGP through the
    CLI: the categories add up. (In process: a subprocess would add its imports to the two counts.)
    Its 48 layers are counted at reduced depths and extrapolated, as a 3B or 8B student is (exact:
    test_depth_scaled_count_equals_the_full_count; measured: 52 -> 22 CPU s)."""
    from click.testing import CliRunner

    from drivekd.cli.train import main
    from drivekd.planner import scale

    monkeypatch.setattr(scale, "DIRECT_MAX_LAYERS", 24)
    student = CONFIGS / "InternVL3-1B-hf"
    r = CliRunner().invoke(main, ["--dry-run", "--json", "--student", str(student), "--seq-len", "1800",
                                  "--gpu-memory", "80GiB", "--no-tiling"])
    assert r.exit_code == 0, r.output[-3000:]
    out = json.loads(r.output[r.output.index("{"):])
    for key in ("peak_bytes", "categories", "flops", "sft_flops", "fits", "gpu_memory_bytes", "seq_len", "params"):
        assert key in out
    cats, N = out["categories"], out["params"]
    assert out["seq_len"] == 1800 and out["gpu_memory_bytes"] == 80 << 30 and out["tokens_per_camera"] == 256
    assert sum(cats.values()) == out["peak_bytes"]
    assert cats["weights"] == 4 * N and cats["gradients"] == 4 * N and cats["grad_rows"] == 16 * N
    assert 8 * N <= cats["optimizer_state"] < 8 * N + 4096
    assert cats["allocator_margin"] == P.margin_bytes(out["tracked_peak_bytes"])
    # Teacher targets: one fp32 (T, T) map per student loss layer (perception 0, reasoning 0..22, planning 22).
    assert cats["teacher_targets"] == 25 * 4 * 1800 * 1800
    assert out["fits"] == (out["peak_bytes"] <= 80 << 30)
    assert out["flops"] > out["sft_flops"] > 0
    assert out["depth_scaled_from"] and out["student_layers"] == 24


def test_dry_run_errors_name_the_flag(tmp_path, tiny_models):
    from click.testing import CliRunner

    from drivekd.cli.train import main

    student = tiny_models / "internvl-student"
    runner = CliRunner()
    r = runner.invoke(main, ["--dry-run", "--student", str(student), "--seq-len", "50"])
    assert r.exit_code == 2 and "--seq-len 50" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["--dry-run", "--student", str(student), "--gpu-memory", "lots"])
    assert r.exit_code == 2 and "--gpu-memory" in r.output
    r = runner.invoke(main, ["--dry-run", "--student", str(tmp_path)])
    assert r.exit_code == 2 and "config.json" in r.output


def test_parse_bytes():
    assert P.parse_bytes("40GiB") == 40 << 30
    assert P.parse_bytes("80GB") == 80 * 10**9
    assert P.parse_bytes("24000MiB") == 24000 << 20
    assert P.parse_bytes("40") == 40 << 30
    assert P.parse_bytes(None) is None


@pytest.mark.slow
def test_suggestions_when_it_does_not_fit(not_fitting):
    # ten counts (the run, its SFT pass, seven suggestions, auto): on a two-layer copy of the tiny
    # student (measured: 30 -> 18 CPU s), the first nine shared with the checkpointing test
    cfg, r, counts = not_fitting
    assert len(counts) == 9
    assert r["fits"] is False and r["grad_engine"] == "rows"
    flags = [s["flags"] for s in r["suggestions"]]
    assert "--gradient-checkpointing" in flags and "--grad-buffer-dtype bfloat16" in flags and "--grad-engine gram" in flags
    by = {s["flags"]: s["peak_bytes"] for s in r["suggestions"]}
    assert by["--grad-buffer-dtype bfloat16"] < r["peak_bytes"]
    assert by["--precision bf16-offload"] < r["peak_bytes"]  # the fp32 run's 20 bytes/parameter -> 4
    assert "does NOT fit" in P.format_report(r)
    # --grad-engine auto decides as the planned GPU would: on a tiny one the rows do not fit.
    auto = P.dry_run(replace(cfg, grad_engine="auto"), seq_len=512, cameras=1, gpu_memory=1 << 20, suggest=False)
    assert auto["grad_engine"] == "gram" and auto["categories"]["grad_rows"] == 0



@pytest.mark.slow
def test_cache_build_dry_run(tiny_models):
    """drivekd-cache build --dry-run: the capture adds its maps to a plain forward, no data needed."""
    from click.testing import CliRunner

    from drivekd.cli.cache import main

    r = CliRunner().invoke(main, ["build", "--dry-run", "--json", "--teacher", "all", "--model",
                                  str(tiny_models / "internvl-teacher"), "--seq-len", "1024"])
    assert r.exit_code == 0, r.output
    (t,) = json.loads(r.output[r.output.index("{"):])["teachers"]
    assert t["roles"] == ["perception", "reasoning", "planning"] and t["layers"] == [0, 1, 2, 3, 4]
    # One fp32 (T, T) map per captured layer; at the peak the last one is still being accumulated.
    one = 4 * 1024 * 1024
    assert (len(t["layers"]) - 1) * one <= t["categories"]["maps"] <= len(t["layers"]) * one
    assert t["peak_bytes"] > t["plain_peak_bytes"] and t["flops"] > t["plain_flops"]


@pytest.mark.slow
@pytest.mark.parametrize("family,kw", [
    # Each engine once: the rows engine's K backwards on the cheaper family (Qwen's vision windows make
    # each of its passes costlier; measured: 66 -> 41 CPU s for the two cases).
    ("internvl", dict(recipe="multi", projection="agp", grad_engine="rows", precision="bf16-offload", dtype="bfloat16")),
    ("qwen2_5_vl", dict(recipe="multi", projection="agp", grad_engine="gram", gradient_checkpointing=True,
                        image_settings=QWEN_SMALL)),
])
def test_depth_scaled_count_equals_the_full_count(tiny_models, one_thread, tmp_path, monkeypatch, family, kw):
    """A deep student is counted at four reduced depths and extrapolated (planner/scale.py): the
    result equals counting every layer, category by category, FLOPs and host memory included."""
    from drivekd.planner import scale

    monkeypatch.setattr(scale, "DIRECT_MAX_LAYERS", 6)  # the tiny students are shallow: scale them too
    # 6 text layers: beyond the reduced copies' 4 and 5, so the text count is extrapolated, not read off.
    student = config_copy(tiny_models / f"{family}-student", tmp_path / family, text=6, vision=2)
    cfg = TrainConfig(student=student, **{"dtype": "float32", **kw})
    family_, L = student_depth(student)
    config = P.student_config(student)
    # One camera at T = 320: the identity is per layer, and Qwen's vision cost grows with the windows
    # of each image (one attention per window): 10 tokens (a few windows) instead of 231 (~60), as
    # the count's cost is its ops, not its sizes (measured: 28 -> 14 CPU s for the Qwen case).
    shapes = P.shapes_for(family_, config, student, 1, 320, cfg.image_settings)
    scaled = P.count_at_depth(cfg, L, family_, None, shapes, config)
    assert scaled.scaled_from  # it did scale
    monkeypatch.setenv("DRIVEKD_PLAN_DIRECT", "1")
    full = P.count_at_depth(cfg, L, family_, None, shapes, config)
    assert not full.scaled_from
    assert scaled.categories == full.categories
    assert (scaled.peak, scaled.flops, scaled.params, scaled.host_peak) == (full.peak, full.flops, full.params, full.host_peak)
    assert scaled.engine == full.engine


# ----------------------------------------------------------------------------- T from the family


def _planned(monkeypatch, student: Path, settings: ImageSettings, cameras: int = 6) -> dict:
    """dry_run's shapes for `student` under `settings`, the step count stubbed out (only T is wanted)."""
    monkeypatch.setattr(P, "count_at_depth", lambda *a, **k: P.Counted({"weights": 1}, 1, 1, 1, 0))
    r = P.dry_run(TrainConfig(student=student, recipe="sft", image_settings=settings), cameras=cameras, suggest=False)
    assert "image settings (a 1600x900 camera" in P.format_report(r)
    return {k: r[k] for k in ("tokens_per_camera", "seq_len", "cameras", "image_settings")}


@pytest.fixture(scope="module")
def six_cameras(tmp_path_factory):
    """One six-camera sample of 1600x900 images (nuScenes size)."""
    from PIL import Image

    from drivekd.data.sample import Sample

    d = tmp_path_factory.mktemp("cams")
    paths = []
    for i in range(6):
        paths.append(d / f"cam{i}.jpg")
        Image.new("RGB", (1600, 900), (40 * i, 120, 150)).save(paths[-1])
    return Sample(id="six", capability="planning", images=tuple(paths), question="What should the ego car do?", answer="Stop.")


@pytest.mark.parametrize("family, settings", [
    ("internvl", ImageSettings()),  # the tiny processor's max_patches 2: 2 tiles + thumbnail
    ("internvl", ImageSettings(tiling=False)),
    ("qwen2_5_vl", ImageSettings()),
    ("qwen2_5_vl", ImageSettings(max_pixels=28 * 28 * 16)),
    ("qwen2_5_vl", ImageSettings(min_pixels=28 * 28 * 1024, max_pixels=28 * 28 * 1024)),
])
def test_planned_T_is_the_processor_paths_tiny(tiny_models, six_cameras, monkeypatch, family, settings):
    """drivekd-train --dry-run's image tokens are what Family.encode (the cache and trainer path)
    gives the same six-camera sample under the same [images] settings."""
    from drivekd.families import Family

    student = tiny_models / f"{family}-student"
    _, lay = Family.from_pretrained(student, image_processing=settings).encode(six_cameras)
    got = _planned(monkeypatch, student, settings)
    assert 6 * got["tokens_per_camera"] == int(lay.vision.sum())
    assert got["seq_len"] == int(lay.vision.sum()) + P.PROMPT_TOKENS + P.ANSWER_TOKENS


def test_planned_T_follows_the_settings_on_real_configs(monkeypatch):
    """Real-size configs without weights or tokenizer: the planned tokens per camera equal the
    family's image processor's output for a 1600x900 camera, and change with the settings (the
    planner once counted one 448-px tile for InternVL and ignored [images] for both families)."""
    import numpy as np

    from drivekd.families import InternVLFamily, Qwen25VLFamily

    image = np.zeros((900, 1600, 3), dtype=np.uint8)
    cases = [
        (InternVLFamily, "InternVL3-1B-hf", ImageSettings(), 2304),  # published: 8 tiles + thumbnail
        (InternVLFamily, "InternVL3-1B-hf", ImageSettings(tiling=False), 256),
        (InternVLFamily, "InternVL3-8B-hf", ImageSettings(max_patches=4), 3 * 256),
        (Qwen25VLFamily, "Qwen2.5-VL-3B-Instruct", ImageSettings(), 1824),
        (Qwen25VLFamily, "Qwen2.5-VL-3B-Instruct", ImageSettings(max_pixels=200704), 231),
        # upscaled to at least 2048 tokens' area, sides rounded up to 28 px: 34 x 61 tokens
        (Qwen25VLFamily, "Qwen2.5-VL-7B-Instruct", ImageSettings(min_pixels=28 * 28 * 2048), 2074),
    ]
    for fam, name, settings, expected in cases:
        folder = CONFIGS / name
        ip = fam.load_image_processor(folder, settings)
        if fam is InternVLFamily:  # InternVLProcessor asks for tiling at call time
            out = ip(images=[image], crop_to_patches=True, return_tensors="pt")
            processed = int(out["num_patches"][0]) * fam.tokens_per_tile(folder)
        else:
            out = ip(images=[image], return_tensors="pt")
            processed = int(out["image_grid_thw"].prod()) // ip.merge_size**2
        got = _planned(monkeypatch, folder, settings)
        assert got["tokens_per_camera"] == processed == expected, (name, settings, got, processed)
        assert got["image_settings"] == fam.effective_image_settings(ip)  # reported as the processor applies them
        assert got["seq_len"] == 6 * expected + P.PROMPT_TOKENS + P.ANSWER_TOKENS


def test_planner_refuses_a_setting_of_the_other_family(monkeypatch):
    with pytest.raises(Exception, match="--max-pixels.*applies to Qwen2.5-VL models"):
        _planned(monkeypatch, CONFIGS / "InternVL3-1B-hf", ImageSettings(max_pixels=200704))


def test_cache_dry_run_honours_the_image_flags(tiny_models, monkeypatch):
    """drivekd-cache build --dry-run counts the teacher pass at the T the build's settings give (the
    shapes it counts at; the count itself is stubbed: test_cache_build_dry_run checks it)."""
    from click.testing import CliRunner

    from drivekd.cli.cache import main

    shapes_seen = []

    def count(model_dir, layers, shapes, *a, **k):
        shapes_seen.append(shapes.seq_len)
        return P.Counted({"weights": 1}, 1, 1, 1, 0)

    monkeypatch.setattr(P, "count_teacher_pass", count)
    seq = {}
    for flags in ([], ["--no-tiling"]):
        r = CliRunner().invoke(main, ["build", "--dry-run", "--json", "--teacher", "perception", "--model",
                                      str(tiny_models / "internvl-teacher"), *flags])
        assert r.exit_code == 0, r.output
        seq[tuple(flags)] = json.loads(r.output[r.output.index("{"):])["teachers"][0]["seq_len"]
    assert seq[()] == 6 * 48 + P.PROMPT_TOKENS + P.ANSWER_TOKENS  # 2 tiles + thumbnail of 16 tokens
    assert seq[("--no-tiling",)] == 6 * 16 + P.PROMPT_TOKENS + P.ANSWER_TOKENS
    assert shapes_seen == [seq[()]] * 2 + [seq[("--no-tiling",)]] * 2  # the capture and the plain pass
