"""The TargetSource contract: both sources implement all of it and answer alike; the Zarr store
reaches its files only through its Backend, so another backend is one new class."""

import inspect
import shutil
from pathlib import Path

import pytest
import torch

from drivekd.data import load_samples
from drivekd.errors import ConfigError, StoreError
from drivekd.store import Encoding, InMemoryTargets, LocalBackend, RoleInfo, SampleTargets, TargetSource, TeacherStore
from drivekd.store.targets import LogitTargets
from drivekd.teacher.build import BuildConfig, build
from drivekd.teacher.online import compute_targets

CONTRACT = sorted(n for n, v in vars(TargetSource).items() if inspect.isfunction(v) and not n.startswith("_"))


@pytest.fixture(scope="module")
def built(tiny_models, small_data, tmp_path_factory) -> Path:
    """The planning role of the tiny InternVL teacher over the five small samples (attention only)."""
    out = tmp_path_factory.mktemp("store") / "cache"
    build(BuildConfig(teachers={"planning": tiny_models / "internvl-teacher"}, data=small_data, images=None, out=out, progress=False))
    return out


@pytest.fixture(scope="module")
def online(tiny_models, small_data, built):
    return compute_targets(tiny_models / "internvl-teacher", load_samples(small_data), {"planning": list(TeacherStore(built).role_info("planning").layers)})


def test_the_contract_is_the_protocol_and_both_sources_implement_all_of_it():
    # The methods the trainer calls besides get/roles/role_info: were reached by getattr probing.
    assert {"sample_status", "signal_status", "read_input_ids", "role_meta", "content_digest", "fingerprint"} < set(CONTRACT)
    for cls in (TeacherStore, InMemoryTargets):
        for name in CONTRACT:
            assert callable(getattr(cls, name, None)), f"{cls.__name__} lacks {name}"
            want = list(inspect.signature(getattr(TargetSource, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters)[: len(want)] == want, (cls.__name__, name)


def test_store_and_online_sources_answer_alike(built, online, small_data):
    store = TeacherStore(built)
    ids = [s.id for s in load_samples(small_data)]
    assert store.roles() == online.roles() == ["planning"]
    a, b = store.role_info("planning"), online.role_info("planning")
    assert (a.layers, a.num_teacher_layers, a.teacher, a.family, a.processor) == (b.layers, b.num_teacher_layers, b.teacher, b.family, b.processor)
    assert store.role_meta("planning")["text_tokens"] == online.role_meta("planning")["text_tokens"] == "paper"
    for src in (store, online):
        with pytest.raises(StoreError, match="role 'reasoning' is not in"):
            src.role_meta("reasoning")
        assert src.sample_status("planning", "no-such-sample") == "missing"
        assert src.signal_status("planning", "no-such-sample", "attention") == "missing"
        assert src.fingerprint("planning", "no-such-sample") is None
        assert src.content_digest("planning", ids) == src.content_digest("planning", list(ids))
        assert src.content_digest("planning", ids) != src.content_digest("planning", ids[:-1])
    for sid in ids:
        for src in (store, online):
            assert src.sample_status("planning", sid) == src.signal_status("planning", sid, "attention") == "complete"
            assert src.signal_status("planning", sid, "logits") == "missing"  # neither holds logits
        assert store.fingerprint("planning", sid) == online.fingerprint("planning", sid) is not None
        assert torch.equal(store.read_input_ids("planning", sid), online.read_input_ids("planning", sid))
        s, o = store.get("planning", sid), online.get("planning", sid)
        assert torch.equal(s.vision, o.vision) and torch.equal(s.text, o.text) and s.maps.keys() == o.maps.keys()
        for l in s.maps:  # fp16 storage, row-scaled: a few 1e-4 of a row that averages 1/(i+1)
            torch.testing.assert_close(s.maps[l], o.maps[l], atol=2e-3, rtol=2e-3)


def test_memory_source_answers_for_what_it_holds_only():
    T = 4
    full = SampleTargets("a", "fp-a", torch.zeros(T, dtype=torch.bool), torch.ones(T, dtype=torch.bool), {0: torch.eye(T)},
                         logits=LogitTargets(torch.arange(2), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2)))
    bare = SampleTargets("b", "fp-b", torch.zeros(T, dtype=torch.bool), torch.ones(T, dtype=torch.bool), {0: torch.eye(T)},
                         input_ids=torch.arange(T, dtype=torch.int32))
    src = InMemoryTargets({"planning": RoleInfo("planning", (0,), 6, "t", "internvl", "p")}, {"planning": {"a": full, "b": bare}},
                          meta={"planning": {"text_tokens": "paper"}})
    assert src.signal_status("planning", "a", "logits") == "complete" and src.signal_status("planning", "b", "logits") == "missing"
    assert src.signal_status("planning", "b", "hidden") == "missing" and src.sample_status("perception", "a") == "missing"
    assert src.read_input_ids("planning", "a") is None  # no ids held: the trainer locates a mismatch by the masks
    assert src.read_input_ids("planning", "b").dtype == torch.int64
    assert src.get("planning", "b").input_ids is not None and src.get("planning", "a", [], {"logits": None}).logits is not None
    assert src.role_meta("planning") == {"text_tokens": "paper"}
    assert src.fingerprint("planning", "b") == "fp-b"
    with pytest.raises(StoreError, match="'c' has no planning targets"):
        src.content_digest("planning", ["a", "c"])


def test_online_targets_name_an_unknown_role(tiny_models, samples):
    with pytest.raises(ConfigError, match="unknown role.*planing.*roles are perception, reasoning, planning"):
        compute_targets(tiny_models / "internvl-teacher", samples[:1], {"planing": [4]})


class Elsewhere(LocalBackend):
    """The store's files under `real`, known to the store only as locations under a root that does
    not exist: any access that bypasses the backend fails (or finds nothing)."""

    def __init__(self, real: Path):
        super().__init__(Path("/nonexistent/drivekd-elsewhere"))
        self.real = real

    def _real(self, loc: Path) -> Path:
        return self.real / Path(loc).relative_to(self.root)

    def zarr_location(self, loc):
        return str(self._real(loc))

    def is_file(self, loc):
        return self._real(loc).is_file()

    def exists(self, loc):
        return self._real(loc).exists()

    def read_json(self, loc):
        return super().read_json(self._real(loc))

    def children(self, loc):
        return [self.root / c.relative_to(self.real) for c in super().children(self._real(loc))]

    def delete(self, loc):
        super().delete(self._real(loc))

    def size(self, loc):
        return super().size(self._real(loc))

    def prepare(self):
        self.real.mkdir(parents=True, exist_ok=True)

    def free_bytes(self):
        return shutil.disk_usage(self.real).free


def test_store_reads_writes_verifies_and_repairs_only_through_its_backend(built, tmp_path):
    real = tmp_path / "copy"
    shutil.copytree(built, real)
    plain = TeacherStore(built)
    st = TeacherStore("unused", backend=Elsewhere(real))
    sid = plain.role_meta("planning")["sample_ids"][0]
    assert st.roles() == ["planning"] and st.verify("planning") == []
    assert st.summary("planning") == plain.summary("planning") and st.sample_bytes("planning") == plain.sample_bytes("planning")
    assert torch.equal(st.get("planning", sid).maps[4], plain.get("planning", sid).maps[4])

    w = TeacherStore("unused", mode="a", backend=Elsewhere(real))
    t, layers = plain.get("planning", sid), list(plain.role_info("planning").layers)
    w.write_sample("planning", "copy-0", plain.read_input_ids("planning", sid), t.vision, t.text, [t.maps[l] for l in layers], layers,
                   Encoding())
    w.mark_skipped("planning", "skip-0", "unreadable image")
    assert (real / "planning" / "samples" / "copy-0" / "zarr.json").is_file() and not Path(w.path).exists()
    again = TeacherStore("unused", backend=Elsewhere(real))
    assert again.sample_status("planning", "copy-0") == "complete" and again.sample_status("planning", "skip-0") == "skipped"
    torch.testing.assert_close(again.get("planning", "copy-0").maps[4], t.maps[4], atol=2e-3, rtol=2e-3)

    (real / "planning" / "samples" / sid / "attn" / "c" / "0" / "0").unlink()  # damage, seen through the backend
    problems = again.verify("planning")
    assert [p.sample_id for p in problems] == [sid] and "/nonexistent/drivekd-elsewhere/planning/samples" in str(problems[0])
    removed = again.repair(problems)
    assert removed and not (real / "planning" / "samples" / sid).exists() and again.sample_status("planning", sid) == "missing"


def test_local_backend_is_what_the_store_needs_of_a_directory(tmp_path):
    b = LocalBackend(tmp_path / "s")
    assert b.children(b.root) == [] and b.size(b.root) == 0 and not b.exists(b.root)
    b.delete(b.root / "absent")  # nothing to remove is not an error
    b.prepare()
    (b.root / "g").mkdir()
    (b.root / "g" / "zarr.json").write_text('{"attributes": {"status": "complete"}}')
    assert b.children(b.root) == [b.root / "g"] and b.is_file(b.root / "g" / "zarr.json") and not b.is_file(b.root / "g")
    assert b.read_json(b.root / "g" / "zarr.json")["attributes"]["status"] == "complete"
    assert b.size(b.root) == len('{"attributes": {"status": "complete"}}') and b.free_bytes() > 0
    with pytest.raises(OSError):
        b.read_json(b.root / "g" / "absent.json")
    b.delete(b.root / "g")
    assert not b.exists(b.root / "g")


def test_process_helpers_are_no_ops_in_one_process(monkeypatch):
    from drivekd.distributed import barrier, fault_hook, rank_world

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("DRIVEKD_FAULT_KILL_AFTER", raising=False)
    monkeypatch.delenv("DRIVEKD_FAULT_SLOW_WRITES", raising=False)
    assert rank_world() == (0, 1)
    barrier(1)
    assert fault_hook() is None  # the passes skip the call
    monkeypatch.setenv("DRIVEKD_FAULT_KILL_AFTER", "1000")
    hook = fault_hook()
    hook()  # counts down; the kill itself is tested end to end (test_cache, test_analyze)
