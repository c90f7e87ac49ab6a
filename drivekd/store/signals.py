"""The store's signals besides attention: the teacher's next-token distribution and hidden states.

`drivekd-cache build --signals attention,logits,hidden` (any order; attention is always stored:
it is the base every sample needs) adds, per sample of a role:

    logits   the teacher's next-token distribution at the answer positions (the positions t whose
             next label t+1 the answer CE uses), as its top-k log-probabilities, their token ids
             and the log of the mass outside them (the "tail"):
                 logits_pos  int32   (A,)    positions t (sample coordinates)
                 logits_lp   float16 (A, k)  log p_teacher(top-k tokens | prefix up to t), descending
                 logits_idx  int32   (A, k)  their token ids (always < the tokenizer's size)
                 logits_tail float32 (A,)    log of the teacher's mass outside those k tokens
             Padding rows of the LM head (ids >= the tokenizer's size, e.g. Qwen2.5-VL-7B's 152064
             rows for a 151665-token tokenizer) never enter the top-k: their mass goes to the tail.
             The tail is a logsumexp of the teacher's fp32 log-probs, so it is exact, not 1 - sum.
    hidden   the teacher's hidden states (output of decoder layer l, HF hidden_states[l + 1]) at
             the role's layers, at the text positions X (the sample's stored `text` mask):
                 hidden_pos  int32   (X,)                positions (sample coordinates)
                 hidden      float16 (n_layers, X, H)    one chunk per layer (float32 for a sample
                                                         whose values would overflow fp16)
             Why X and not every position: vision tokens are ~85% of a six-camera sequence
             (6 x 256 of ~1800 at InternVL3's 448 px tiles) and the hidden MSE on them would mostly
             re-teach the vision tower's output, which the attention terms and CE already shape;
             X holds every prompt and answer token the losses read (the answer included), and a
             reasoning role stores 27 layers of 3584 floats per position: all positions would be
             ~7x the bytes (docs/STORE.md gives the figures).

Each signal's arrays sit in the sample's group beside the attention arrays and have their own
completion mark inside the sample's `zarr.json` (`signals.<name>`: status, settings, CRC32C of each
array), written in one write after the arrays: a build that adds a signal to an existing store
never touches the attention files, and a killed one leaves the signal unmarked, to be redone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from zarr.codecs import BloscCodec

from drivekd.errors import ConfigError
from drivekd.store.integrity import checksum, chunk_file

SIGNALS = ("attention", "logits", "hidden")
EXTRA = ("logits", "hidden")  # stored besides the attention base
# Default k: tools/bench_signals.py measures bytes per answer position against the error of the
# stored top-k KL versus the full-vocabulary KL. 256 is the only k within ~5% at tau 1 and 2 on its
# peaked proxy teacher, and costs little: ~3 GB raw per role for 10k InternVL3-8B samples, next to
# ~470 GB of reasoning hidden states (docs/STORE.md, "Choosing k").
DEFAULT_TOP_K = 256
ARRAYS = {
    "logits": ("logits_pos", "logits_lp", "logits_idx", "logits_tail"),
    "hidden": ("hidden_pos", "hidden"),
}
_DENSE = {"write_empty_chunks": True}


def parse_signals(spec: str | list | tuple | None) -> tuple[str, ...]:
    """'logits,attention' -> ('attention', 'logits'): order-free, attention always included."""
    if spec is None:
        return ("attention",)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = {s.strip() for s in items if str(s).strip()}
    bad = sorted(names - set(SIGNALS))
    if bad:
        raise ConfigError(f"--signals: unknown signal(s) {', '.join(bad)} (choose from {', '.join(SIGNALS)}, comma separated)")
    return tuple(s for s in SIGNALS if s in names or s == "attention")


def vocab_identity(tokenizer) -> dict:
    """What the KL term must share with the student: the tokenizer's vocabulary (sha256 of the
    token -> id map) and its size (the ids a top-k index can take)."""
    vocab = tokenizer.get_vocab()
    return {"tokenizer_fingerprint": hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest(),
            "tokenizer_size": int(max(vocab.values()) + 1)}


def answer_rows(labels: torch.Tensor) -> torch.Tensor:
    """(T,) labels -> positions t whose logits the answer CE uses (labels[t + 1] is a target)."""
    from drivekd.roles import IGNORE_INDEX

    return (labels[1:] != IGNORE_INDEX).nonzero().squeeze(-1)


def topk_logits(logits: torch.Tensor, k: int, n_tok: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, V) teacher logits -> (lp (A, k) fp16, idx (A, k) int32, log_tail (A,) fp32).

    Top-k over the tokenizer's ids [0, n_tok) only; everything else (the other real tokens and the
    LM head's padding rows) is the tail, log-summed exactly in fp32.
    """
    lp = torch.log_softmax(logits.float(), -1)  # (A, V)
    k = min(k, n_tok)
    top, idx = lp[:, :n_tok].topk(k, -1)  # (A, k), descending
    rest = lp.scatter(-1, idx, float("-inf"))
    tail = torch.logsumexp(rest, -1)  # (A,); -inf when nothing is left (k = V)
    return (top.to(torch.float16).cpu().numpy(), idx.to(torch.int32).cpu().numpy(), tail.cpu().numpy().astype(np.float32))


def hidden_dtype(h: torch.Tensor) -> torch.dtype:
    """fp16 unless a value would overflow it (some LLMs carry "massive activations" of 1e4 and
    more in a few channels): then the sample's hidden array is fp32, never inf."""
    return torch.float16 if bool(h.abs().max() < 65000) else torch.float32


def _codec(typesize: int) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=typesize)


def write_arrays(g, name: str, payload: dict, fault=None) -> dict:
    """Create signal `name`'s arrays in sample group `g` (replacing leftovers of a killed build).
    Returns their checksums (hidden: one per layer row, as attn)."""
    sums: dict = {}
    if name == "logits":
        for key, fill in (("logits_pos", 0), ("logits_lp", np.nan), ("logits_idx", -1), ("logits_tail", np.nan)):
            v = np.ascontiguousarray(payload[key])
            arr = g.create_array(key, shape=v.shape, dtype=v.dtype, chunks=tuple(max(1, n) for n in v.shape),
                                 compressors=_codec(v.dtype.itemsize), fill_value=fill, config=_DENSE, overwrite=True)
            arr[...] = v
            sums[key] = checksum(v)
    elif name == "hidden":
        pos = np.ascontiguousarray(payload["hidden_pos"])
        arr = g.create_array("hidden_pos", shape=pos.shape, dtype=pos.dtype, chunks=(max(1, pos.size),), compressors=_codec(4),
                             fill_value=0, config=_DENSE, overwrite=True)
        arr[...] = pos
        sums["hidden_pos"] = checksum(pos)
        h = payload["hidden"]  # (n_layers, X, H) fp16 (fp32 for a sample whose values overflow fp16)
        X, H = max(1, h.shape[1]), h.shape[2]
        arr = g.create_array("hidden", shape=h.shape, dtype=h.dtype, chunks=(1, X, H), compressors=_codec(h.dtype.itemsize), fill_value=np.nan,
                             config=_DENSE, overwrite=True)
        sums["hidden"] = []
        for k in range(h.shape[0]):
            row = np.ascontiguousarray(h[k])
            arr[k] = row
            sums["hidden"].append(checksum(row))
            if fault is not None:
                fault()
    else:
        raise ValueError(f"unknown signal {name!r}")
    return sums


def expected_files(d: Path, name: str, n_layers: int) -> list[Path]:
    """Every file a complete signal of a sample group has."""
    files = []
    for key in ARRAYS[name]:
        files.append(d / key / "zarr.json")
        if key == "hidden":
            files += [d / "hidden" / "c" / str(k) / "0" / "0" for k in range(n_layers)]
        elif key == "logits_lp" or key == "logits_idx":
            files.append(d / key / "c" / "0" / "0")
        else:
            files.append(chunk_file(d, key))
    return files


def chunk_of(d: Path, key: str, row: int | None) -> Path:
    if key == "hidden":
        return d / "hidden" / "c" / str(row) / "0" / "0"
    if key in ("logits_lp", "logits_idx"):
        return d / key / "c" / "0" / "0"
    return chunk_file(d, key)


def hidden_width(config_json: dict) -> int:
    return int((config_json.get("text_config") or config_json)["hidden_size"])


def vocab_rows(config_json: dict) -> int:
    return int((config_json.get("text_config") or config_json).get("vocab_size") or config_json["vocab_size"])
