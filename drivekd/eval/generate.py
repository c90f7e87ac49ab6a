"""Model half of evaluation: resumable batched generation and deployment metrics.

`generate_predictions` answers every sample with the model's chat template and returns DriveBench
records (each input record plus "pred"). It is resumable at batch granularity: every finished
answer is appended (flushed, fsynced) to `predictions.partial.jsonl` in the run folder, and a
restarted run keeps every id found there or in a finished `predictions.json` (see
`drivekd.eval.predictions`). Records are keyed by `Sample.id` (`drivekd.ids`), which `drivekd.eval.score.record_id` gives
back for the written record: the store, the training run and the scorer use one id per record.

`measure_deploy` gives the paper's deployment columns (METHOD.md section 9): peak memory,
generation throughput (new tokens / generation time) and the median time-to-first-token.
"""

from __future__ import annotations

import copy
import logging
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from drivekd.data.sample import Sample
from drivekd.errors import ConfigError, DataError
from drivekd.eval.predictions import PREDICTIONS_FILE, PartialWriter, finalize_predictions, load_existing, partial_path

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


class PredictionRecords(list):
    """The records `generate_predictions` returns (a plain list of dicts), plus what this call did.

    generated: ids answered by the model in this call, in generation order.
    resumed: ids taken from an earlier, interrupted or finished, run.
    """

    def __init__(self, records: Sequence[dict[str, Any]], generated: Sequence[str], resumed: Sequence[str]):
        super().__init__(records)
        self.generated = list(generated)
        self.resumed = list(resumed)


# ----------------------------------------------------------------------------------- settings


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was requested but CUDA is not available: use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`dtype` (a torch dtype or a name such as "bf16"), or bf16 on GPU and fp32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}") from None


def _load(model_dir: str | Path, device: torch.device, dtype: torch.dtype, image_settings=None):
    from drivekd.families import Family, load_model

    family = Family.from_pretrained(model_dir, image_processing=image_settings)  # [images] settings
    model = load_model(model_dir, dtype=dtype, device=device, capture=False)  # plain sdpa
    model.eval()
    return family, model


def generation_config(model, family, max_new_tokens: int, temperature: float, top_p: float, min_new_tokens: int = 0):
    """The checkpoint's generation config with our length, sampling and special-token settings.

    Greedy unless temperature > 0. In greedy mode the checkpoint's sampling knobs are cleared so
    transformers does not warn that they are ignored; other settings (e.g. repetition_penalty)
    stay as the checkpoint ships them.
    """
    cfg = copy.deepcopy(model.generation_config)
    sample = temperature > 0
    cfg.update(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=cfg.top_k if sample else None,
        num_beams=1,
        pad_token_id=family.pad_token_id,
        eos_token_id=family.eos_token_id,
    )
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- records


def drivebench_record(sample: Sample) -> dict[str, Any]:
    """The DriveBench record of a sample, without "pred".

    DriveBench samples keep their original record unchanged. Drive-KD samples become a
    DriveBench-like record: id, question (image tags removed), answer, question_type (the
    capability, which the scorer maps to itself) and image_path (the paths as written).
    """
    if sample.source == "drivebench":
        return dict(sample.record)
    if sample.source in ("drivelm", "robosense"):
        # Keep scene, frame and category: the DriveLM / RoboSense exporters and scorers join on them.
        from drivekd.eval.formats import prediction_record

        return prediction_record(sample)
    images = sample.record.get("images")
    if not (isinstance(images, list) and len(images) == len(sample.images)):
        images = [str(p) for p in sample.images]
    rec = {
        "id": sample.id,
        "question": sample.question,
        "answer": sample.answer,
        "question_type": sample.capability,
        "image_path": list(images),
    }
    if "tag" in sample.record:
        rec["tag"] = sample.record["tag"]
    return rec


def _keyed(samples: Sequence[Sample]) -> tuple[list[dict[str, Any]], list[str]]:
    """Records and their keys: each sample's own id (`drivekd.ids`), the id it has in the teacher
    store and the training run; `record_id` of the record written gives the same id back."""
    records = [drivebench_record(s) for s in samples]
    keys = [s.id for s in samples]
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            raise DataError(
                f"two samples have the id {k!r} (same frame_token and question, or the same explicit `id`): "
                "remove the duplicate or give them distinct `id` fields"
            )
        seen[k] = i
    return records, keys


# ----------------------------------------------------------------------------------- generation


@torch.no_grad()
def _answer(family, model, batch: Sequence[Sample], cfg, device: torch.device) -> list[str]:
    """Answers of one batch (left padded, so every row's new tokens start at the same column).

    A batch that runs out of GPU memory is split in halves and retried.
    """
    inputs = family.build_inputs(batch, with_answer=False, padding_side="left").to(device)
    prompt_len = inputs.tensors["input_ids"].shape[1]
    try:
        out = model.generate(**inputs.tensors, generation_config=cfg)  # (B, prompt_len + new)
    except torch.cuda.OutOfMemoryError:
        if len(batch) == 1:
            raise
        del inputs
        torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("out of GPU memory on a batch of %d; retrying as %d + %d", len(batch), half, len(batch) - half)
        return _answer(family, model, batch[:half], cfg, device) + _answer(family, model, batch[half:], cfg, device)
    texts = family.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def answer_samples(family, model, samples: Sequence[Sample], *, max_new_tokens: int, batch_size: int = 8,
                   device: torch.device) -> list[str]:
    """Greedy answers of `samples` by a model already in memory (drivekd-train's --eval-generate), with
    generate_predictions' prompts, generation settings and decoding; in input order."""
    cfg = generation_config(model, family, max_new_tokens, 0.0, 1.0)
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        answers += _answer(family, model, list(samples[start : start + batch_size]), cfg, device)
    return answers


def generate_predictions(
    model_dir: str | Path,
    samples: Sequence[Sample],
    out_dir: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    image_settings=None,
) -> PredictionRecords:
    """Answer every sample; write `out_dir/predictions.json`; return its records (input order).

    Ids already answered (in `predictions.partial.jsonl` or a finished `predictions.json` in
    `out_dir`) are kept and not regenerated; the model is not even loaded when nothing is left.
    Each batch's answers are appended to the progress file as soon as the batch finishes.
    device: default cuda when available, else cpu. dtype: default bf16 on GPU, fp32 on CPU.
    Greedy decoding unless temperature > 0 (then sampling with temperature and top_p).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    out_dir = Path(out_dir)
    pred_path = out_dir / PREDICTIONS_FILE
    records, keys = _keyed(samples)
    done = load_existing(pred_path)
    resumed = [k for k in keys if k in done]
    pending = [(k, s) for k, s in zip(keys, samples) if k not in done]
    # Samples with as many images have prompts of similar length: batching them wastes less padding.
    pending.sort(key=lambda ks: len(ks[1].images))
    if resumed:
        log.info("%s: %d of %d samples already answered; generating %d", out_dir, len(resumed), len(keys), len(pending))

    generated: list[str] = []
    if pending:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        family, model = _load(model_dir, dev, dt, image_settings)
        cfg = generation_config(model, family, max_new_tokens, temperature, top_p)
        from tqdm.auto import tqdm

        with PartialWriter(partial_path(pred_path)) as partial, tqdm(
            total=len(keys), initial=len(resumed), desc=f"generate {Path(model_dir).name}", unit="q",
            disable=not progress, file=sys.stderr,
        ) as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                answers = _answer(family, model, [s for _, s in chunk], cfg, dev)
                for (key, _), pred in zip(chunk, answers):
                    done[key] = pred
                    partial.write(key, pred)
                    generated.append(key)
                bar.update(len(chunk))
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    final = finalize_predictions(pred_path, records, done, ids=keys)
    return PredictionRecords(final, generated, resumed)


# ----------------------------------------------------------------------------------- deployment


def _peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return rss_bytes / 1024**3, "process_peak_rss"


def measure_deploy(
    model_dir: str | Path,
    samples: Sequence[Sample],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    runs: int = 5,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    image_settings=None,
) -> dict[str, Any]:
    """Peak memory, generation throughput and median time-to-first-token (METHOD.md section 9).

    The prompt is the first `batch_size` samples (their chat-template prompts, left padded). After
    one warm-up generation, `runs` generations of exactly `max_new_tokens` new tokens per row
    (end-of-sequence ignored, so every run does the same work) give the throughput: new tokens /
    wall time of `generate`, prefill included; the median over runs is reported. TTFT is the
    median wall time of `runs` generations with max_new_tokens=1. CUDA is synchronised around
    every timing. Peak memory (GB = 2**30 bytes) is CUDA's max_memory_allocated since just before
    the model loads (GPU), else the peak resident set size of the whole process (CPU; includes
    everything the process held before), named in `memory_kind`.
    """
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if not samples:
        raise DataError("measure_deploy needs at least one sample to build a prompt from")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    family, model = _load(model_dir, dev, dt, image_settings)
    batch = list(samples[:batch_size])
    inputs = family.build_inputs(batch, with_answer=False, padding_side="left").to(dev)
    full = generation_config(model, family, max_new_tokens, 0.0, 1.0, min_new_tokens=max_new_tokens)
    first = generation_config(model, family, 1, 0.0, 1.0)

    def timed(cfg) -> tuple[float, int]:
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs.tensors, generation_config=cfg)
        _sync(dev)
        elapsed = time.perf_counter() - t0
        return elapsed, (out.shape[1] - inputs.tensors["input_ids"].shape[1]) * out.shape[0]

    timed(full)  # warm-up: kernels, allocator, caches
    throughputs = []
    for _ in range(runs):
        seconds, new_tokens = timed(full)
        throughputs.append(new_tokens / seconds)
    ttfts = [timed(first)[0] for _ in range(runs)]
    peak_gb, memory_kind = _peak_memory_gb(dev)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {
        "peak_memory_gb": peak_gb,
        "memory_kind": memory_kind,
        "tokens_per_s": statistics.median(throughputs),
        "ttft_s": statistics.median(ttfts),
        "device": str(dev),
        "device_name": device_name,
        "dtype": str(dt).removeprefix("torch."),
        "runs": runs,
        "batch_size": len(batch),
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": int(inputs.tensors["input_ids"].shape[1]),
    }
    del model, inputs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result
