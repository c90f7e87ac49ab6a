"""`dry_run(cfg)`: does a training run fit one GPU, and what does a step cost, without a GPU or weights.

The student is built from its config.json alone on fake tensors (drivekd/planner/fake.py), fed a
synthetic batch of the run's shapes (T tokens, the cameras' image tokens as the student's family
counts them under the run's image settings and the folder's image-processor files, a 200-token answer, one
teacher target (B, T, T) per student loss layer), and the REAL step code (drivekd/trainer/step.py)
runs one micro-step and the optimizer step: forward with capture, the configured losses, the
per-loss backwards or the fast path, combine, clipping, AdamW. The optimizer state is initialised
first (one zero-gradient AdamW step, before counting) so the count is that of a steady-state step.
`MemoryTracker` counts every allocation by category and the FLOPs (torch.utils.flop_counter's
formulas, as FlopCounterMode counts them); an SFT
step (CE only, one backward) of the same student on the same shapes is counted for the ratio.

--precision: the student is built in the run's weight dtype, so weights and the flat gradient
count 2 bytes/parameter in the bf16 modes; BF16AdamW's device state (moments, Kahan compensation)
is optimizer_state; bf16-offload's fp32 masters, their gradients, their AdamW state and the host
step's temporaries are host memory, reported apart (`host_peak_bytes`). A deep student (more than
48 layers) is counted at a few reduced depths and extrapolated (drivekd/planner/scale.py).

What differs on a GPU (the allocator margin below covers it): the CUDA context and library
workspaces, the caching allocator's 512-byte rounding and fragmentation, and CUDA's sdpa kernels
(flash / memory-efficient) whose saved statistics are smaller than the CPU kernel's. Fake tensors
are CPU tensors here (a CPU torch build refuses fake CUDA tensors); byte sizes are the same. Bf16
autocast runs with the CPU autocast op list, which casts matmuls and linears like CUDA's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from drivekd.errors import ConfigError, ModelError
from drivekd.families.base import detect_family, family_class
from drivekd.images import ImageSettings

log = logging.getLogger(__name__)

GiB = 1 << 30
# Allocator margin: CUDA context + cuBLAS/cuDNN workspaces (~0.75 GiB on an A100/H100 with lazy
# module loading) plus 8% of the counted peak for the caching allocator's rounding and
# fragmentation (typical reserved/allocated ratios of a training step with varying T).
CONTEXT_BYTES = 3 * GiB // 4
FRAGMENTATION = 0.08
ANSWER_TOKENS = 200  # answer span of the synthetic sample (logits kept for these positions)
PROMPT_TOKENS = 64  # system + question text around the images


@dataclass
class Shapes:
    """The synthetic sample: tokens per camera, cameras, total length."""

    family: str
    cameras: int
    tokens_per_camera: int
    seq_len: int
    image_settings: dict = field(default_factory=dict)  # the processor's effective settings, [images] keys

    @property
    def vision_tokens(self) -> int:
        return self.cameras * self.tokens_per_camera


def parse_bytes(text: str | int | None, flag: str = "--gpu-memory") -> int | None:
    """'40GiB', '40GB', '80G', '24000MiB', or a bare number of GiB -> bytes (GB = 10^9, GiB and G = 2^30)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip()
    units = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 1 << 20, "m": 1 << 20, "mb": 10**6, "tib": 1 << 40, "b": 1, "": GiB}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = s[len(num):].strip().lower()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag} {text!r}: give a size such as 40GiB, 80GB or 24000MiB")
    return int(value * units[unit])


# ----------------------------------------------------------------------------- shapes and inputs


def student_config(student: Path):
    from drivekd.families.base import model_config

    if not (Path(student) / "config.json").is_file():
        raise ConfigError(f"--student {student}: no config.json (the dry run needs the model's config.json, no weights)")
    return model_config(student)  # as load_model builds it (an InternVL head the top level leaves silent: untied)


def model_depth(model_dir: Path, flag: str = "--student") -> tuple[str, int]:
    """(family, text decoder layers) of a config folder, as the family reads them from its config."""
    try:
        family = detect_family(model_dir)
    except ModelError as e:
        raise ConfigError(f"{flag}: {e}") from None
    return family, family_class(family).depth(student_config(model_dir)).text


def camera_tokens(family: str, student: Path, images: ImageSettings | None = None, flag: str = "--student") -> tuple[int, dict]:
    """Vision tokens one 1600x900 camera contributes, and the settings the processor applies: the
    family's count under the folder's processor with the run's image settings ([images] / image
    flags), as the processor path gives."""
    fam = family_class(family)
    try:
        effective = fam.effective_image_settings(fam.load_image_processor(student, images))
        return fam.image_tokens(student, images), effective
    except ModelError as e:
        raise ConfigError(f"{flag}: {e}") from None


def shapes_for(family: str, config, student: Path, cameras: int, seq_len: int | None,
               images: ImageSettings | None = None, flag: str = "--student") -> Shapes:
    """The synthetic sample of `cameras` 1600x900 cameras: T = `seq_len`, or the cameras' image
    tokens + 264 text tokens."""
    per, effective = camera_tokens(family, student, images, flag)
    need = cameras * (per + 2) + ANSWER_TOKENS + 8
    T = seq_len if seq_len is not None else cameras * per + PROMPT_TOKENS + ANSWER_TOKENS
    if T < need:
        raise ConfigError(f"--seq-len {T}: {cameras} camera(s) take {cameras * per} image tokens and the answer "
                          f"{ANSWER_TOKENS}; give at least {need}, or fewer --cameras (or fewer image tokens: "
                          "the image flags / [images] table)")
    return Shapes(family, cameras, per, T, effective)


def synthetic_batch(shapes: Shapes, config, plan):
    """A Batch of one sample: text, then the cameras' image tokens (each between two delimiter
    tokens), more text, a 200-token answer; each teacher target is a (1, T, T) shape placeholder
    (the caller makes the run's tensor of that shape)."""
    from drivekd.families.base import ModelInputs, TokenLayout
    from drivekd.roles import IGNORE_INDEX as IGNORE
    from drivekd.trainer.data import Batch

    T, n, per = shapes.seq_len, shapes.cameras, shapes.tokens_per_camera
    text_id = 100
    img = int(config.image_token_id)
    ids = torch.full((T,), text_id, dtype=torch.long)
    vision = torch.zeros(T, dtype=torch.bool)
    pos = 8
    fam = family_class(shapes.family)
    start, end = (text_id if i is None else int(i) for i in fam.delimiter_ids(config))
    for _ in range(n):
        ids[pos] = start
        ids[pos + 1 : pos + 1 + per] = img
        vision[pos + 1 : pos + 1 + per] = True
        ids[pos + 1 + per] = end
        pos += per + 2
    # vectorised: a per-position loop here went through the planner's dispatch modes T times (~0.25 CPU s a count at T = 1800)
    special = ((ids == start) | (ids == end)) & (ids != text_id)
    text = ~vision & ~special
    labels = torch.full((T,), IGNORE, dtype=torch.long)
    labels[T - ANSWER_TOKENS :] = ids[T - ANSWER_TOKENS :]
    tensors = {"input_ids": ids[None], "attention_mask": torch.ones(1, T, dtype=torch.long)}
    tensors.update(fam.synthetic_image_inputs(config, vision, n, per))
    lay = TokenLayout("dry-run", ids, vision, text, labels, T - ANSWER_TOKENS, "")
    inputs = ModelInputs(tensors, [lay], "right")
    targets = {t.name: {s: (1, T, T) for s, _ in t.pairs} for t in plan.terms}
    caps = ["planning"] if plan.multi else [plan.cfg.recipe]
    return Batch(inputs, targets, caps, ["dry-run"], T)


# ----------------------------------------------------------------------------- the run plan


def dry_plan(cfg, student_L: int, family: str, teacher_L: int | None = None):
    """A RunPlan for the dry run: the recipe's terms, rows and weights; no data or store needed.

    Without --cache the teacher is taken to have the student's depth (layer-group matching then
    pairs layer to layer): the student's loss layers, and so every shape the step sees, are the same
    whatever the teacher's depth, since each student layer learns one (mean-over-group) target."""
    from drivekd.store.targets import RoleInfo
    from drivekd.terms import ATTENTION, recipe
    from drivekd.trainer.plan import RunPlan, parse_mix

    L_T = teacher_L or student_L
    # Only the attention terms are counted: a recipe's other terms (--recipe kl / hidden) are left
    # out, a rough count (their logits gather or hidden-state projection is not in it).
    roles = recipe(cfg.recipe).weighted_roles(cfg)
    infos = {r: RoleInfo(r, tuple(range(L_T)), L_T, "", family, "") for r in roles}
    terms = ATTENTION.resolve(cfg, roles, infos, student_L)
    rows = ["ce"] + [t.name for t in terms]
    static = [cfg.w_ce] + [cfg.term_weight(t.name) for t in terms]
    return RunPlan(cfg, [], family, student_L, terms, rows, static, parse_mix(cfg.mix), infos, None, 1, 1)


def uncounted_terms(cfg) -> list[str]:
    """The term kinds of the run's recipe that dry_plan leaves out of the count (all but attention)."""
    from drivekd.terms import recipe

    return [n for n in recipe(cfg.recipe).terms if n != "attention"]


def sft_config(cfg):
    """The same run as plain fine-tuning: CE only (one backward, no capture, no projection); its
    step alone (the run's validation pass is counted with the run's own step)."""
    return replace(cfg, recipe="sft", layers=None, mid_range=None, dynamic_weights=False,
                   eval_data=None, eval_images=None, eval_every=0, eval_generate=False, save_best=None)


# ----------------------------------------------------------------------------- one counted step


@dataclass
class Counted:
    categories: dict[str, int]  # bytes live at the peak, by category
    peak: int  # their sum
    flops: int
    params: int
    baseline: int  # bytes live when counting started (weights, gradients, rows, optimizer state, inputs, targets)
    rss_increase: int | None = None  # real runs: peak RSS over the step minus RSS before it (malloc trimmed)
    engine: str = ""  # the per-loss gradient engine the step used (rows | gram | none), and why
    engine_reason: str = ""
    trainable: int = 0  # parameters with requires_grad (--freeze / --lora leave fewer)
    host_peak: int = 0  # host memory of --precision bf16-offload (fp32 masters, their gradients and AdamW state)
    scaled_from: str = ""  # counted at reduced depths and extrapolated (planner/scale.py): which depths
    # the categories at the peak of each phase: "micro" (forward, backwards, combine) and "update"
    # (average, clip, AdamW); --fsdp divides them differently per rank (planner/sharded.py)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)


def build_student(student: Path, family: str, config, dtype=torch.float32):
    from drivekd.families.capture import CAPTURE_IMPL

    return family_class(family).model_class()._from_config(
        config, attn_implementation={"text_config": CAPTURE_IMPL, "vision_config": "sdpa", "": "sdpa"}, dtype=dtype)


# The GPU a plan is for when --gpu-memory is not given (the paper's A100-40GB): decides
# --grad-engine auto as the real run on that GPU would.
PLANNED_GPU_MEMORY = 40 * 2**30


def count_step(cfg, plan, shapes: Shapes, config, *, fake: bool = True, model=None, device_memory: int | None = None,
               evaluate="auto") -> Counted:
    """Run one micro-step and the optimizer step of the real step code, counting memory and FLOPs.

    fake=True: on fake tensors (no memory, no compute). fake=False: on real tensors (the proof
    tests compare both on tiny models), with `model` given or built with random weights.
    evaluate: an EvalSpec (drivekd/planner/eval_peak.py), None, or "auto" (the run's: --eval-data):
    then the validation pass after the optimizer step is counted too, as phases["eval"]."""
    if evaluate == "auto":
        from drivekd.planner.eval_peak import eval_spec

        evaluate = eval_spec(cfg)
    import drivekd.trainer.step as step_mod
    from drivekd.distributed import Dist
    from drivekd.planner.memory import MemoryTracker
    from drivekd.trainer.student import autocast_dtype, prepare_student
    from drivekd.trainer.step import AssumeFinite, TrainStep

    tracker = MemoryTracker()
    with contextlib.ExitStack() as stack:
        # GradBuffers compares .grad data pointers (fake ones are placeholders, equal as on real tensors).
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        if fake:
            from drivekd.planner.fake import fake_mode

            fm, sh = stack.enter_context(fake_mode())
            to_run = sh.real

            def targets_like(shape):
                with sh.paused():
                    return torch.zeros(shape)
        else:
            to_run = lambda t: t  # noqa: E731
            targets_like = lambda shape: torch.zeros(shape)  # noqa: E731
        from drivekd.optim.precision import param_dtype

        wdtype = param_dtype(cfg.precision)  # built in the run's weight dtype, as the loop loads it
        if model is None:
            if fake:
                with sh.paused():
                    model = build_student(cfg.student, shapes.family, config, wdtype)
            else:
                model = build_student(cfg.student, shapes.family, config, wdtype)
        # --freeze / --lora: gradients, rows and optimizer state below cover the trainable params only.
        with sh.paused() if fake else contextlib.nullcontext(), _adapters_stay_put(fake and cfg.lora):
            model = prepare_student(model, cfg)
        # The GPU run's compute dtype (auto: bf16), run under CPU autocast here.
        # --grad-engine auto decides as on the planned GPU (--gpu-memory, else a 40 GiB A100).
        ts = TrainStep(model, plan, Dist("cpu"), autocast_dtype(cfg, torch.device("cuda" if fake else "cpu")), AssumeFinite(),
                       device_memory=device_memory or PLANNED_GPU_MEMORY)
        for group in ts.optimizer.param_groups:
            group["foreach"] = True  # AdamW's default on CUDA (its temporaries are counted as there)
        # --precision bf16-offload: the fp32 masters' AdamW step runs on the host; its state and
        # temporaries are host memory (counted apart), the device part of the step is in-place copies.
        if hasattr(ts.optimizer, "host_context"):
            ts.optimizer.host_context = tracker.host_side
        ts.optimizer_step()  # zero gradients: allocates AdamW's state, leaves the weights as they are
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # host tensors (token layout) are real
            batch = synthetic_batch(shapes, config, plan)
        batch.inputs.tensors = {k: to_run(v) for k, v in batch.inputs.tensors.items()}
        batch.targets = {r: {s: targets_like(m) for s, m in d.items()} for r, d in batch.targets.items()}
        tracker.add(list(model.parameters()), "weights")  # frozen ones too
        tracker.add(ts.grads.flat, "gradients")
        if ts.bufs is not None:
            tracker.add(ts.bufs.buffer, "grad_rows")
        tracker.add([v for st in ts.optimizer.state.values() for v in st.values() if torch.is_tensor(v)], "optimizer_state")
        tracker.add(getattr(ts.optimizer, "host_tensors", list)(), "host")
        tracker.add(list(batch.inputs.tensors.values()), "inputs")
        tracker.add([m for d in batch.targets.values() for m in d.values()], "teacher_targets")
        tracker.reset_peak()
        baseline = tracker.current
        rss_before = None if fake else _rss_now()

        real_capture = step_mod.capture_attention

        def tagging(real):
            @contextlib.contextmanager
            def observed_capture(*a, **k):
                # The real capture; its maps are tagged while they are alive.
                with real(*a, **k) as maps:
                    try:
                        yield maps
                    finally:
                        tracker.add(list(maps.values()), "maps")
            return observed_capture

        step_mod.capture_attention = tagging(real_capture)
        phases = {}
        try:
            with tracker:
                ts.micro_step(batch, list(plan.static_weights), list(range(1, len(plan.row_names))), where="the dry run")
                phases["micro"], micro_peak = tracker.peak_by_category(), tracker.peak
                tracker.reset_peak()
                ts.average(1)
                ts.clip()
                ts.optimizer_step()
                ts.zero_grad()
                phases["update"], update_peak = tracker.peak_by_category(), tracker.peak
                rss = None if fake else _peak_rss() - rss_before
                flops = int(tracker.flops)  # the step's (the validation pass's are not a micro-step's)
                if evaluate is not None:
                    # --eval-data: validation after this optimizer step, the training state resident
                    from drivekd.planner.eval_peak import count_eval

                    phases.update(count_eval(tracker, ts, plan, batch, evaluate, shapes.seq_len - ANSWER_TOKENS, tagging))
        finally:
            step_mod.capture_attention = real_capture
        micro, update = phases["micro"], phases["update"]
        cats, peak = (micro, micro_peak) if micro_peak >= update_peak else (update, update_peak)
        return Counted(cats, peak, flops, sum(p.numel() for p in model.parameters()), baseline, rss,
                       ts.engine, ts.engine_reason, sum(p.numel() for p in ts.params), tracker.host_peak,
                       phases=phases)


@contextlib.contextmanager
def _adapters_stay_put(active: bool):
    """peft moves each new LoRA layer to its base layer's device and dtype with Module.to, which
    fake parameters refuse (`_apply` must swap a FakeTensor parameter, and fake tensors carry
    weakrefs). The planner builds every weight on the CPU in fp32, where peft creates the adapters,
    so each move is a no-op: skip it while the adapters are added on a fake run."""
    if not active:
        yield
        return
    from unittest import mock

    with mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
        yield


def _rss_now() -> int:
    """Resident bytes now, after handing malloc's free memory back (so reused free blocks do not
    hide an increase); resets the kernel's peak-RSS mark (VmHWM) to it. ru_maxrss cannot serve:
    Linux carries it over from the parent across fork and exec."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _above_cut(plan, L: int) -> int:
    """Decoder layers above the Gram engine's cut (0: cut at the LM head's input)."""
    from drivekd.trainer.step import cut_layer

    c = cut_layer(plan, L)
    return 0 if c is None else L - c


def count_at_depth(cfg, L: int, family: str, teacher_L: int | None, shapes: Shapes, config, *,
                   device_memory: int | None = None) -> Counted:
    """count_step at the student's full depth: directly for a shallow student, else from reduced
    depths, extrapolated (drivekd/planner/scale.py: why it is exact, and the checks that fall back
    to the direct count). DRIVEKD_PLAN_DIRECT=1 always counts directly."""
    from drivekd.layers import LayerSpecError
    from drivekd.planner import scale

    def direct() -> Counted:
        return count_step(cfg, dry_plan(cfg, L, family, teacher_L), shapes, config, device_memory=device_memory)

    d = scale.depth_of(config, family)
    # --freeze / --lora change which parameters train (and so --grad-engine auto's choice): direct.
    if os.environ.get("DRIVEKD_PLAN_DIRECT") == "1" or not scale.worth_scaling(d) or cfg.freeze or cfg.lora:
        return direct()
    from drivekd.optim.precision import param_dtype
    from drivekd.trainer.step import choose_engine

    # The full model's parameters (meta tensors: no memory), for --grad-engine auto's decision
    # (the reduced copies would choose by their own size) and to check the fitted count.
    with torch.device("meta"):
        full = build_student(cfg.student, family, config, param_dtype(cfg.precision))
    params = [p for p in full.parameters()]
    n_params = sum(p.numel() for p in params)
    K = len(dry_plan(cfg, L, family, teacher_L).row_names)
    engine, reason = "none", ""
    if K > 1 and (cfg.projection != "none" or cfg.dynamic_weights):
        engine, reason = choose_engine(cfg, params, K, torch.device("cuda"), device_memory or PLANNED_GPU_MEMORY)
    fixed = replace(cfg, grad_engine=engine) if engine != "none" else cfg
    done: dict = {}  # Depth -> (Counted, layers above the Gram cut): each reduced depth counted once

    def at(small):
        if small not in done:
            small_plan = dry_plan(fixed, small.text, family)
            conf = scale.reduced_config(config, family, small)
            done[small] = (count_step(fixed, small_plan, shapes, conf, device_memory=device_memory),
                           _above_cut(small_plan, small.text))
        return done[small]

    fitted = None
    try:
        for a in range(scale.TEXT_A, scale.TEXT_A + scale.MAX_SHIFT + 1):
            counts = [at(p)[0] for p in scale.points(family, a)]
            above = [at(p)[1] for p in scale.points(family, a)]
            # The Gram engine's backward is K-batched below its cut and |S|-wide above it
            # (step.cut_layer): the counts are affine in the depth only while the number of layers
            # above the cut is (a spec mixing absolute and L-relative layers may move the cut otherwise).
            if engine == "gram" and scale.extrapolate(above, d, a) != _above_cut(dry_plan(cfg, L, family, teacher_L), L):
                return direct()
            # Each phase's peak must sit at the same point of the step at every depth (scale.py): the
            # fit has to reproduce one more count, every category of every phase, else move the base up.
            check = scale.check_point(family, a)
            if _fit(counts, check, a) == _fit([at(check)[0]] * len(counts), check, a):  # (one count repeated: its own values)
                fitted = (_fit(counts, d, a), a)
                break
            log.info("planner: the counts at %d-%d text layers are not affine in the depth (the peak moves); "
                     "fitting from %d", a, a + 2, a + 1)
    except (ConfigError, LayerSpecError):
        return direct()  # e.g. a --layers index beyond the reduced depth
    if fitted is None:
        log.warning("the reduced-depth counts are not affine in the depth up to %d text layers; counting all %d layers",
                    scale.TEXT_A + scale.MAX_SHIFT + 2, L)
        return direct()
    got, a = fitted
    phases = got.pop("phases")
    # The step's peak is its larger phase (count_step), at the full depth: each phase is affine in the
    # depth, their maximum is not (the micro-step can overtake the update between two depths).
    micro, update = phases["micro"], phases["update"]
    cats = dict(micro if sum(micro.values()) >= sum(update.values()) else update)
    if got["params"] != n_params or min(cats.values()) < 0 or min(min(p.values()) for p in phases.values()) < 0:
        log.warning("the reduced-depth counts do not extrapolate to the full model; counting all %d layers", L)
        return direct()
    pts = ", ".join(f"{p.text}+{sum(p.vision)}" for p in scale.points(family, a))
    return Counted(cats, sum(cats.values()), got["flops"], got["params"], got["baseline"], None, engine, reason,
                   trainable=got["trainable"], host_peak=got["host_peak"], scaled_from=f"text+vision layers {pts}",
                   phases=phases)


def _fit(counts: list[Counted], d, a: int) -> dict[str, Any]:
    """Every counted quantity at depth `d`, extrapolated from `counts` at scale.points(family, a)
    (given one count repeated: that count's own values)."""
    from drivekd.planner import scale

    ext = lambda get: scale.extrapolate([get(c) for c in counts], d, a)  # noqa: E731
    return {"phases": {ph: {k: ext(lambda c, ph=ph, k=k: c.phases[ph][k]) for k in counts[0].phases[ph]}
                       for ph in counts[0].phases},
            **{q: ext(lambda c, q=q: getattr(c, q)) for q in ("flops", "params", "baseline", "host_peak", "trainable")}}


# ----------------------------------------------------------------------------- the report


def margin_bytes(tracked_peak: int) -> int:
    return CONTEXT_BYTES + int(FRAGMENTATION * tracked_peak)


def dry_run(cfg, *, seq_len: int | None = None, cameras: int = 6, gpu_memory: int | None = None,
            suggest: bool = True, nproc: int = 1) -> dict[str, Any]:
    """The planner's answer for the run `cfg` (a TrainConfig): a JSON-ready dict. With cfg.fsdp,
    each of `nproc` ranks' peak (drivekd/planner/sharded.py)."""
    if cfg.fsdp:
        return _dry_run_fsdp(cfg, seq_len=seq_len, cameras=cameras, gpu_memory=gpu_memory, nproc=nproc)
    if nproc != 1:
        raise ConfigError(f"--nproc {nproc} plans a sharded student: add --fsdp (data-parallel ranks each hold the whole "
                          "student, so one process's plan is every rank's)")
    if cfg.student is None:
        raise ConfigError("--student is required (a folder with the student's config.json; weights are not read)")
    if not isinstance(cameras, int) or cameras < 0:
        raise ConfigError(f"--cameras must be an integer >= 0, got {cameras!r}")
    family, L = model_depth(Path(cfg.student))
    teacher_L = None
    if cfg.cache is not None:
        from drivekd.trainer.plan import open_source

        src = open_source(cfg, None)
        teacher_L = max((src.role_info(r).num_teacher_layers for r in src.roles()), default=None)
    config = student_config(cfg.student)
    shapes = shapes_for(family, config, Path(cfg.student), cameras, seq_len, cfg.image_settings)

    def one(c) -> Counted:
        return count_at_depth(c, L, family, teacher_L, shapes, config, device_memory=gpu_memory)

    run = one(cfg)
    # Suggestions (suggest=False) need the peak only: no SFT pass for them.
    sft = one(sft_config(cfg)) if suggest and dry_plan(cfg, L, family, teacher_L).terms else run
    cats = dict(run.categories)
    cats["allocator_margin"] = margin_bytes(run.peak)
    peak = sum(cats.values())
    validation = _eval_report(cfg, run)  # --eval-data: the validation pass, the training state resident
    needed = max(peak, validation.get("eval_peak_bytes", 0))  # the verdict's figure
    fits = None if gpu_memory is None else needed <= gpu_memory
    out: dict[str, Any] = {
        "peak_bytes": peak,
        "tracked_peak_bytes": run.peak,
        "categories": cats,
        "flops": run.flops,
        "sft_flops": sft.flops,
        "flops_ratio": run.flops / sft.flops if sft.flops else None,
        "sft_peak_bytes": sft.peak + margin_bytes(sft.peak),
        "fits": fits,
        "gpu_memory_bytes": gpu_memory,
        "seq_len": shapes.seq_len,
        "cameras": shapes.cameras,
        "tokens_per_camera": shapes.tokens_per_camera,
        "image_settings": shapes.image_settings,
        "params": run.params,
        "trainable_params": run.trainable,
        "family": family,
        "student_layers": L,
        "recipe": cfg.recipe,
        "projection": cfg.projection,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "grad_buffer_dtype": cfg.grad_buffer_dtype,
        "precision": cfg.precision,
        "host_peak_bytes": run.host_peak,
        "grad_engine": run.engine,
        "depth_scaled_from": run.scaled_from,
        "grad_engine_reason": run.engine_reason,
        "micro_batch": 1,
        "flops_per": "micro-step (one sample); an optimizer step is --grad-accum of them",
        "suggestions": [],
        "phases": run.phases,
        "needed_bytes": needed,
        **validation,
    }
    if uncounted_terms(cfg):  # see dry_plan
        out["approximation"] = f"--recipe {cfg.recipe} is counted as CE only (its second loss row, its targets and any projection are not)"
    if fits is False and suggest:
        out["suggestions"] = _suggestions(cfg, seq_len, cameras, gpu_memory, run.engine)
    return out


def _eval_report(cfg, run: Counted) -> dict[str, Any]:
    """The validation pass's figures (drivekd/planner/eval_peak.py), {} without --eval-data: its
    categories at its peak plus the allocator margin, and what it was counted as."""
    counted = run.phases.get("eval")
    if counted is None:
        return {}
    cats = {**counted, "allocator_margin": margin_bytes(sum(counted.values()))}
    gen = run.phases.get("eval_generate")
    return {"eval_peak_bytes": sum(cats.values()), "eval_categories": cats,
            "eval_generate_peak_bytes": None if gen is None else sum(gen.values()) + margin_bytes(sum(gen.values())),
            "eval_kv_cache_bytes": None if gen is None else run.phases["eval_kv_cache"]["kv_cache"],
            "eval_pass": {"teacher_terms": True, "generate_new_tokens": cfg.eval_max_new_tokens if cfg.eval_generate else None,
                          "micro_batch": 1}}


def _dry_run_fsdp(cfg, *, seq_len, cameras, gpu_memory, nproc: int) -> dict[str, Any]:
    """--fsdp: the step counted in one process with the engine the sharded run uses (rows), then
    divided per rank; no suggestions (more ranks is the knob)."""
    from drivekd.planner import sharded

    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be an integer >= 1, got {nproc!r}")
    per_loss = cfg.projection != "none" or cfg.dynamic_weights
    one = replace(cfg, fsdp=False, grad_engine="rows" if per_loss else cfg.grad_engine)
    r = dry_run(one, seq_len=seq_len, cameras=cameras, gpu_memory=None)
    family = r["family"]
    with torch.device("meta"):
        units = sharded.unit_bytes(build_student(Path(cfg.student), family, student_config(cfg.student)))
    # each phase per rank; the peak is the larger (the update phase's temporaries are the shards')
    ranked = [sharded.per_rank(r["phases"]["micro"], nproc, units), sharded.per_rank(r["phases"]["update"], nproc, units, update=True)]
    cats = max(ranked, key=lambda c: sum(c.values()))
    tracked = sum(cats.values())
    cats["allocator_margin"] = margin_bytes(tracked)
    peak = sum(cats.values())
    return {**r, "categories": cats, "peak_bytes": peak, "tracked_peak_bytes": tracked, "gpu_memory_bytes": gpu_memory,
            "fits": None if gpu_memory is None else peak <= gpu_memory, "fsdp": sharded.describe(nproc), "nproc": nproc,
            "units": units, "suggestions": [], "sft_peak_bytes": r["sft_peak_bytes"], "needed_bytes": peak}


def _suggestions(cfg, seq_len, cameras, gpu_memory, engine: str) -> list[dict[str, Any]]:
    """Trainer options that would make the run fit, each with its planned peak. `engine`: the
    per-loss gradient engine the run used (rows options only make sense with rows)."""
    options = []
    if not cfg.gradient_checkpointing:
        options.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    has_rows = engine == "rows"
    if cfg.grad_buffer_dtype != "bfloat16" and has_rows:
        options.append(("--grad-buffer-dtype bfloat16", {"grad_buffer_dtype": "bfloat16"}))
    if len(options) == 2:
        options.append(("--gradient-checkpointing --grad-buffer-dtype bfloat16",
                        {"gradient_checkpointing": True, "grad_buffer_dtype": "bfloat16"}))
    if has_rows:
        options.append(("--grad-engine gram", {"grad_engine": "gram"}))
        if not cfg.gradient_checkpointing:
            options.append(("--grad-engine gram --gradient-checkpointing", {"grad_engine": "gram", "gradient_checkpointing": True}))
    if cfg.precision == "fp32":
        # bf16 weights and gradients with fp32 masters + AdamW on the host: 16 of the 20 fp32 bytes
        # per parameter leave the GPU, and the optimizer math stays fp32 AdamW.
        lean = {"precision": "bf16-offload", "dtype": "auto" if cfg.dtype in ("float32", "float16") else cfg.dtype}
        options.append(("--precision bf16-offload", lean))
        if engine != "none" and not (engine == "gram" and cfg.gradient_checkpointing):
            options.append(("--precision bf16-offload --grad-engine gram --gradient-checkpointing",
                            {**lean, "grad_engine": "gram", "gradient_checkpointing": True}))
    out = []
    for flags, change in options:
        r = dry_run(replace(cfg, **change), seq_len=seq_len, cameras=cameras, gpu_memory=gpu_memory, suggest=False)
        out.append({"flags": flags, "peak_bytes": r["needed_bytes"], "fits": r["fits"]})
    return out


def format_report(r: dict[str, Any]) -> str:
    """The human-readable answer."""
    g = lambda b: f"{b / GiB:7.2f} GiB"  # noqa: E731
    trainable = f" ({r['trainable_params'] / 1e6:.1f}M trainable)" if r["trainable_params"] != r["params"] else ""
    lines = [f"drivekd-train --dry-run: {r['family']} student, {r['params'] / 1e9:.2f}B parameters{trainable}, recipe {r['recipe']}, "
             f"projection {r['projection']}, T = {r['seq_len']} ({r['cameras']} camera(s) x {r['tokens_per_camera']} "
             f"image tokens), micro-batch 1",
             "image settings (a 1600x900 camera; [images] table / image flags): "
             + (", ".join(f"{k} {v}" for k, v in r.get("image_settings", {}).items()) or "-"),
             f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, gradient engine {r['grad_engine'] or 'none'}"
             f" ({r['grad_engine_reason'] or 'one backward'}), gradient rows {r['grad_buffer_dtype']}, "
             f"precision {r['precision']}",
             ("per rank, --fsdp over %d ranks (gathered weights: %s):" % (r["nproc"], r["fsdp"]["gathered_weights"])
              if r.get("fsdp") else "peak memory by category:")]
    for k, v in r["categories"].items():
        lines.append(f"  {k:<18}{g(v)}")
    lines.append(f"  {'total':<18}{g(r['peak_bytes'])}   (plain fine-tuning: {g(r['sft_peak_bytes']).strip()})")
    if r.get("depth_scaled_from"):
        lines.append(f"counted at reduced depths ({r['depth_scaled_from']}) and extrapolated to {r['student_layers']} "
                     "text layers (exact: the step is affine in the depth; drivekd/planner/scale.py)")
    if r.get("eval_peak_bytes") is not None:
        e, ec = r["eval_pass"], r["eval_categories"]
        gen = f", --eval-generate: {e['generate_new_tokens']} new tokens" if e["generate_new_tokens"] else ""
        parts = ", ".join(f"{k} {ec[k] / GiB:.2f}" for k in ("teacher_targets", "maps", "kv_cache", "temporaries") if ec.get(k))
        lines.append(f"validation pass (--eval-data{gen}; no-grad forward with the teacher terms, the training state "
                     f"resident): {g(r['eval_peak_bytes']).strip()} at its peak, margin included ({parts} GiB)")
        if e["generate_new_tokens"]:
            lines.append(f"  of which generation: {g(r['eval_generate_peak_bytes']).strip()} at its peak "
                         f"(KV cache of prompt + {e['generate_new_tokens']} tokens: {g(r['eval_kv_cache_bytes']).strip()})")
    if r["host_peak_bytes"]:
        lines.append(f"host memory (offloaded fp32 masters, their gradients and AdamW state): {g(r['host_peak_bytes']).strip()}")
    ratio = f"{r['flops_ratio']:.2f}x" if r["flops_ratio"] else "-"
    lines.append(f"FLOPs per micro-step: {r['flops'] / 1e12:.2f} TFLOP; plain fine-tuning {r['sft_flops'] / 1e12:.2f} TFLOP "
                 f"({ratio})")
    if r["fits"] is not None:
        verdict = "fits" if r["fits"] else "does NOT fit"
        which = " (the larger of the step and the validation pass)" if r.get("eval_peak_bytes") is not None else ""
        lines.append(f"verdict: {verdict} in {g(r['gpu_memory_bytes']).strip()}{which}")
        for s in r["suggestions"]:
            lines.append(f"  with {s['flags']}: {g(s['peak_bytes']).strip()} -> {'fits' if s['fits'] else 'still too big'}")
        if r["fits"] is False and not any(s["fits"] for s in r["suggestions"]):
            lines.append("  no trainer option alone makes it fit: a smaller --seq-len / fewer cameras, or a larger GPU")
    if r.get("approximation"):
        lines.append(f"rough count: {r['approximation']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the teacher pass


def count_teacher_pass(model_dir: Path, layers: list[int] | None, shapes: Shapes, dtype=torch.bfloat16, shard=None) -> Counted:
    """One teacher forward (no grad, weights in `dtype`) on the synthetic sample, with the
    head-mean capture of `layers` (None: a plain sdpa forward, the baseline), counted like the step.
    shard: applied to the built model before counting (cuts it to one tensor-parallel rank's
    shard, drivekd.planner.teacher_parallel)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from drivekd.families.capture import capture_attention
    from drivekd.planner.fake import fake_mode
    from drivekd.planner.memory import MemoryTracker

    family, _ = model_depth(model_dir, "--model")
    config = student_config(model_dir)
    tracker = MemoryTracker()
    with fake_mode() as (fm, sh):
        with sh.paused():
            model = build_student(model_dir, family, config, dtype).eval()
            if shard is not None:
                shard(model)
        with unset_fake_temporarily():
            batch = synthetic_batch(shapes, config, _NoTerms())
        tensors = {k: sh.real(v) for k, v in batch.inputs.tensors.items()}
        tensors["pixel_values"] = tensors["pixel_values"].to(dtype)
        tracker.add(list(model.parameters()), "weights")
        tracker.add(list(tensors.values()), "inputs")
        tracker.reset_peak()
        with tracker, torch.no_grad():
            cap = capture_attention(model, layers, attention_mask=tensors["attention_mask"].bool()) if layers else contextlib.nullcontext({})
            with cap as maps:
                model(**tensors, logits_to_keep=1, use_cache=False)
                tracker.add(list(maps.values()), "maps")
        return Counted(tracker.peak_by_category(), tracker.peak, int(tracker.flops),
                       sum(p.numel() for p in model.parameters()), 0)


class _NoTerms:
    terms: list = []
    multi = False

    class cfg:  # noqa: N801
        recipe = "perception"


def teacher_passes(teachers: dict[str, Path], layers: str | None, *, seq_len: int | None, cameras: int,
                   images: ImageSettings | None):
    """The build's teacher forwards, one per checkpoint (roles naming one checkpoint share it):
    yields (checkpoint, its roles, its shapes, the sorted union of its roles' layers)."""
    from drivekd.layers import LayerSpecError, recipe_layers, resolve_layers

    by_ckpt: dict[Path, list[str]] = {}
    for role, path in teachers.items():
        by_ckpt.setdefault(Path(path), []).append(role)
    for ckpt, roles in by_ckpt.items():
        family, L = model_depth(ckpt, "--model")
        shapes = shapes_for(family, student_config(ckpt), ckpt, cameras, seq_len, images, "--model")
        try:
            want = sorted({l for r in roles for l in (resolve_layers(layers, L) if layers else recipe_layers(r, L))})
        except LayerSpecError as e:
            raise ConfigError(f"--layers {layers!r}: {e} (the teacher {ckpt} has {L} decoder layers)") from None
        yield ckpt, roles, shapes, want


def dry_run_teacher(teachers: dict[str, Path], layers: str | None = None, *, seq_len: int | None = None,
                    cameras: int = 6, dtype: str = "bfloat16", images: ImageSettings | None = None) -> dict[str, Any]:
    """`drivekd-cache build --dry-run`: each checkpoint's forward with capture of its roles' layers
    (roles naming one checkpoint share one forward), against a plain sdpa forward. `images`: the
    build's image settings, which decide T."""
    out = []
    for ckpt, roles, shapes, want in teacher_passes(teachers, layers, seq_len=seq_len, cameras=cameras, images=images):
        cap = count_teacher_pass(ckpt, want, shapes, getattr(torch, dtype))
        plain = count_teacher_pass(ckpt, None, shapes, getattr(torch, dtype))
        out.append({"model": str(ckpt), "roles": roles, "layers": want, "seq_len": shapes.seq_len, "params": cap.params,
                    "peak_bytes": cap.peak + margin_bytes(cap.peak), "tracked_peak_bytes": cap.peak,
                    "categories": {**cap.categories, "allocator_margin": margin_bytes(cap.peak)},
                    "flops": cap.flops, "plain_peak_bytes": plain.peak + margin_bytes(plain.peak), "plain_flops": plain.flops})
    return {"teachers": out}


def format_teacher_report(r: dict[str, Any]) -> str:
    lines = []
    for t in r["teachers"]:
        lines.append(f"teacher pass {t['model']} ({'+'.join(t['roles'])}, {len(t['layers'])} captured layer(s), T = {t['seq_len']}): "
                     f"peak {t['peak_bytes'] / GiB:.2f} GiB (plain sdpa forward {t['plain_peak_bytes'] / GiB:.2f} GiB), "
                     f"{t['flops'] / 1e12:.2f} TFLOP (plain {t['plain_flops'] / 1e12:.2f})")
    return "\n".join(lines)
