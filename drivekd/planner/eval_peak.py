"""The validation pass's peak (`--eval-data`, `--eval-generate`), counted while the training state is resident.

Validation runs after an optimizer step (drivekd/trainer/validation.py) with the weights, the flat
gradient, the per-loss gradient rows and AdamW's state all still on the GPU; the training batch of
the last micro-step is gone. The planner counts, on the same tracker and the same fake tensors as the
step (drivekd/planner/plan.py `count_step`, which calls `count_eval` after its optimizer step):

* the validation forward: `validation.batch_losses` itself, under torch.no_grad with the model in
  eval mode, on an eval batch of the step's shapes (T tokens, the cameras, micro-batch 1). With
  `terms` (the store holds the teacher terms' targets for the eval samples: then validation runs
  the training's forward with capture) its (1, T, T) teacher targets are resident and the head-mean
  maps of the loss layers are made; without, CE only. The dry run plans with terms (the larger).
* --eval-generate: `model.generate` on the sample's prompt (T - 200 answer tokens) under the step's
  autocast, greedy, to exactly --eval-max-new-tokens tokens (no end-of-sequence token: the longest
  answer, the real run stops earlier when the model ends it). Its KV cache is reported as its own
  category: per layer two (1, kv_heads, prompt + new tokens, head_dim) tensors, in the dtypes the
  attention makes them (InternVL3-1B, fp32 weights under bf16 autocast: K fp32, as RoPE's fp32
  cos/sin promote it, V bf16; 0.03 GiB at T = 1800 and 32 new tokens).

Nothing is saved for backward under no_grad, so a validation forward's peak is its largest layer's
temporaries (the capture's (1, H, T, T) scores at a loss layer) and the logits of the answer span,
on top of the resident state: usually below the step's, whose saved activations it does not have.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class EvalSpec:
    """What one validation runs, as far as memory goes."""

    terms: bool  # the teacher terms measured too (the training's forward with capture, targets resident)
    new_tokens: int | None  # --eval-generate: --eval-max-new-tokens; None: no generation


def eval_spec(cfg) -> EvalSpec | None:
    """The run's validation (None without --eval-data)."""
    if cfg.eval_data is None:
        return None
    return EvalSpec(terms=True, new_tokens=cfg.eval_max_new_tokens if cfg.eval_generate else None)


def count_eval(tracker, ts, plan, batch, spec: EvalSpec, prompt_len: int, tag_maps) -> dict[str, dict[str, int]]:
    """Bytes live at the validation pass's peaks, by category (kv_cache included), on `tracker` with
    the training state registered and resident: {"eval": the pass's peak, "eval_generate": the
    generation's alone and "eval_kv_cache": {"kv_cache": the whole cache at the end} (with
    --eval-generate)}. `batch`: the step's batch, reused as the eval batch
    (same shapes; its targets dropped when `spec.terms` is off); `prompt_len`: tokens before the
    answer (the generation prompt); `tag_maps`: a capture_attention wrapper that tags the maps."""
    import drivekd.families.capture as capture_mod
    from drivekd.trainer.validation import batch_losses

    model = ts.model
    was_training = model.training
    if not spec.terms:
        batch.targets = {}  # a CE-only validation loads no targets
    real_capture = capture_mod.capture_attention
    capture_mod.capture_attention = tag_maps(real_capture)
    model.eval()
    try:
        tracker.reset_peak()
        with torch.no_grad():
            batch_losses(ts, plan.student_layers, batch, spec.terms)
        out = {"eval": tracker.peak_by_category(extra=("kv_cache",))}
        if spec.new_tokens:
            out["eval_generate"], cache = _count_generation(tracker, ts, batch, spec.new_tokens, prompt_len)
            out["eval_kv_cache"] = {"kv_cache": cache}  # a phase of one number, so depth scaling extrapolates it too
            out["eval"] = max(out["eval"], out["eval_generate"], key=lambda c: sum(c.values()))
    finally:
        capture_mod.capture_attention = real_capture
        model.train(was_training)
    return out


def planned_generation_config(model, new_tokens: int):
    """drivekd-eval's greedy generation settings (eval/generate.py `generation_config`), with no
    end-of-sequence token: every answer runs to `new_tokens` (the planned worst case, and a fake
    run cannot read the generated tokens to stop on one)."""
    from drivekd.eval.generate import generation_config

    return generation_config(model, SimpleNamespace(pad_token_id=None, eos_token_id=None), new_tokens, 0.0, 1.0)


def prompt_inputs(tensors: dict[str, torch.Tensor], prompt_len: int) -> dict[str, torch.Tensor]:
    """The sample's inputs up to its answer: every per-token tensor (B, T) cut to (B, prompt_len)."""
    T = tensors["input_ids"].shape[1]
    return {k: v[:, :prompt_len] if v.dim() == 2 and v.shape[1] == T else v for k, v in tensors.items()}


def _count_generation(tracker, ts, batch, new_tokens: int, prompt_len: int) -> tuple[dict[str, int], int]:
    """model.generate on the prompt, counted -> (categories at its peak, bytes of the whole KV cache at
    the end). The eval batch's targets are gone (validation's loss pass is over), its inputs stand for
    the generation batch's (the same images and prompt tokens)."""
    from transformers import DynamicCache

    model = ts.model
    batch.targets = {}
    prompt = prompt_inputs(batch.inputs.tensors, prompt_len)
    cfg = planned_generation_config(model, new_tokens)
    real_update = DynamicCache.update
    held: dict[int, int] = {}  # layer -> bytes of its cache (K and V) after its latest update

    def update(self, key_states, value_states, layer_idx, *a, **k):
        out = real_update(self, key_states, value_states, layer_idx, *a, **k)
        tracker.add(list(out), "kv_cache")  # the layer's whole cache after this step (K and V)
        held[layer_idx] = sum(t.untyped_storage().nbytes() for t in out)
        return out

    # The decoding loop's stop check (transformers 5.24's StopCheck) reads the (fake) generated tokens'
    # finished flags: stop on the length instead, where a run without an end-of-sequence token stops anyway.
    try:
        from transformers.generation.utils import StopCheck
    except ImportError:  # older 5.x: the loop's own check, on flags the max-length criterion keeps shadowed
        StopCheck = None
    end = prompt["input_ids"].shape[1] + new_tokens

    def stop(self, unfinished, tokens, length: int) -> bool:
        return length >= end

    stopping = _patched(StopCheck, "__call__", stop) if StopCheck is not None else contextlib.nullcontext()

    tracker.reset_peak()
    # generate's input preparation loses the prompt ids' shadow (planner/fake.py), and the models'
    # placeholder-count check then reads a fake count: skipped here (TRANSFORMERS_DISABLE_TORCH_CHECK,
    # as for any fake run; the real run checks its real inputs).
    with _patched(DynamicCache, "update", update), stopping, _env("TRANSFORMERS_DISABLE_TORCH_CHECK", "1"), torch.no_grad(), \
            ts.autocast(cache=True):  # as the real generation (drivekd/trainer/validation.py)
        model.generate(**prompt, generation_config=copy.deepcopy(cfg))
    # the peak is often the prefill's (its temporaries), before the cache has grown: the whole cache
    # of prompt + new tokens is reported apart
    return tracker.peak_by_category(extra=("kv_cache",)), sum(held.values())


@contextlib.contextmanager
def _patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
