"""The store's public raw access (StoreReader.sample_group / prefix_group): the groups hold what
`get` decodes, so tools that measure the format (tools/bench_integrity.py) need no private path."""

import numpy as np
import torch

from drivekd.store import Encoding, TeacherStore, decode_map


def _causal(T: int, g: torch.Generator) -> torch.Tensor:
    s = torch.randn(T, T, generator=g).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1)


def test_raw_groups_hold_what_get_decodes(tmp_path):
    T, P, layers = 12, 8, [0, 2]
    st = TeacherStore(tmp_path / "cache", mode="a")
    st.init_role("reasoning", {"family": "internvl", "teacher_path": "synthetic", "checkpoint_fingerprint": "x",
                               "processor_fingerprint": "y", "text_tokens": "paper", "num_teacher_layers": 3,
                               "encoding": Encoding().to_dict(), "layers": layers, "role": "reasoning",
                               "sample_ids": ["shared", "alone"]})
    g = torch.Generator().manual_seed(0)
    vision = torch.arange(T) < 4
    head = [_causal(T, g) for _ in layers]
    st.write_prefix("reasoning", "p-0", torch.arange(P), [m[:P, :P] for m in head], layers, Encoding(), 1)
    st.write_sample("reasoning", "shared", torch.arange(T), vision, ~vision, [_causal(T, g)[P:] for _ in layers], layers,
                    Encoding(), prefix=("p-0", P))
    st.write_sample("reasoning", "alone", torch.arange(T), vision, ~vision, [_causal(T, g) for _ in layers], layers, Encoding())

    store = TeacherStore(tmp_path / "cache")
    for sid in ("shared", "alone"):
        checked = store.get("reasoning", sid)
        grp = store.sample_group("reasoning", sid)
        assert int(grp.attrs["length"]) == T and grp.attrs["fingerprint"] == checked.fingerprint
        assert torch.equal(torch.from_numpy(np.asarray(grp["vision"][:])), checked.vision)
        assert torch.equal(torch.from_numpy(np.asarray(grp["text"][:])), checked.text)
        key = grp.attrs.get("prefix")
        assert (key == "p-0") == (sid == "shared")
        for k, layer in enumerate(layers):
            packed = np.asarray(grp["attn"][k])
            if key:  # the shared rows come first in the packed lower triangle
                packed = np.concatenate([np.asarray(store.prefix_group("reasoning", key)["attn"][k]), packed])
            assert torch.equal(decode_map(packed, T), checked.maps[layer])
