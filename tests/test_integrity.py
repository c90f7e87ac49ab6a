"""Never train on damaged or foreign targets (issue 11): each test reproduces one row of the issue's
table on a real store (bytes flipped, files deleted, two real build processes, a real full disk)."""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from drivekd.cli.cache import main as cache_cli
from drivekd.cli.train import main as train_cli
from drivekd.errors import StoreError
from drivekd.teacher.build import BuildConfig, build
from drivekd.store.lock import StoreLock
from conftest import five_with_ids
from drivekd.store import Encoding, TeacherStore

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(demo_data, tmp_path_factory) -> Path:
    """Five samples with explicit ids: a six-view group of two (a shared prefix) and three single views."""
    return five_with_ids(demo_data, tmp_path_factory.mktemp("integrity-data"))


def _cfg(tiny_models, data, out, **kw):
    t = tiny_models / "internvl-teacher"
    return BuildConfig(teachers={"perception": t, "reasoning": t, "planning": t}, data=data, images=None, out=out, progress=False, **kw)


@pytest.fixture(scope="module")
def built(tiny_models, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity-store") / "cache"
    assert build(_cfg(tiny_models, data, out))["written"] == 5
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(built: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(built, out)
    return out


def _flip(path: Path, offset: int, n: int = 16, mask: int = 0xFF) -> None:
    b = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        b[i] ^= mask
    path.write_bytes(bytes(b))


def _prefixed(store: Path, role: str) -> tuple[str, list[str]]:
    """A shared prefix key of `role` and the samples that use it."""
    g = zarr.open_group(str(store / role), mode="r")
    users: dict[str, list[str]] = {}
    for sid in g.attrs["sample_ids"]:
        key = g["samples"][sid].attrs.get("prefix")
        if key:
            users.setdefault(key, []).append(sid)
    key = next(iter(users))
    return key, users[key]


def _group(store: Path, role: str, sid: str) -> list[str]:
    """The samples built in one unit with `sid` (those sharing its prefix), itself included."""
    g = zarr.open_group(str(store / role), mode="r")
    key = g["samples"][sid].attrs.get("prefix")
    return [s for s in g.attrs["sample_ids"] if key and g["samples"][s].attrs.get("prefix") == key] or [sid]


def _verify(store: Path, *flags):
    return CliRunner().invoke(cache_cli, ["verify", *flags, str(store)])


def _train(tiny_models, data, store, out, *extra):
    args = ["--cache", str(store), "--student", str(tiny_models / "internvl-student"), "--data", str(data), "--out", str(out),
            "--num-workers", "0", "--no-progress", "--grad-accum", "1", "--warmup-ratio", "0", "--lr", "1e-3", *extra]
    return CliRunner().invoke(train_cli, args)


# ----------------------------------------------------------------------------- checksums


def test_flipped_bytes_in_an_attention_chunk_stop_verify_reader_and_training(tiny_models, data, built, tmp_path):
    store = _copy(built, tmp_path)
    sid = "s3"
    chunk = store / "reasoning" / "samples" / sid / "attn" / "c" / "2" / "0"
    _flip(chunk, chunk.stat().st_size // 2)
    r = _verify(store)
    assert r.exit_code == 1 and f"reasoning/{sid}" in r.output and "checksum" in r.output, r.output
    assert _verify(store, "--quick").exit_code == 0  # --quick reads no content
    with pytest.raises(StoreError, match=rf"reasoning targets of sample '{sid}', layer 2: chunk file {chunk}"):
        TeacherStore(store).get("reasoning", sid)
    TeacherStore(store).get("reasoning", sid, [0, 1, 3, 4])  # the other layers of that sample are sound
    # Read in a DataLoader worker, as by default: still one line naming it, no worker traceback.
    r = _train(tiny_models, data, store, tmp_path / "run", "--max-steps", "5", "--save-every", "0", "--num-workers", "1")
    assert r.exit_code == 2 and sid in r.output and "layer 2" in r.output and str(chunk) in r.output, r.output
    assert "Traceback" not in r.output


def test_one_bit_in_a_shared_prefix_names_every_member_and_repair_rebuilds(tiny_models, data, built, tmp_path):
    store = _copy(built, tmp_path)
    key, members = _prefixed(store, "planning")
    assert len(members) == 2
    chunk = store / "planning" / "prefixes" / key / "attn" / "c" / "0" / "0"
    _flip(chunk, chunk.stat().st_size // 3, n=1, mask=0x04)
    with pytest.raises(StoreError, match=rf"sample '{members[0]}', layer 4 \(shared prefix {key}.*chunk file {chunk}"):
        TeacherStore(store).get("planning", members[0])
    r = _verify(store)
    assert r.exit_code == 1 and all(f"planning/{m}" in r.output for m in members) and "shared prefix" in r.output, r.output
    r = _verify(store, "--repair")
    assert r.exit_code == 1 and "removed" in r.output
    res = build(_cfg(tiny_models, data, store))
    assert res["already"] == 3  # only the damaged group is redone
    assert _verify(store).exit_code == 0
    assert _files(store) == _files(built)


def test_missing_chunk_is_an_error_never_zeros_and_is_rebuilt(tiny_models, data, built, tmp_path):
    store = _copy(built, tmp_path)
    chunk = store / "reasoning" / "samples" / "s4" / "attn" / "c" / "1" / "0"
    chunk.unlink()
    group = _group(store, "reasoning", "s4")
    with pytest.raises(StoreError, match=rf"layer 1: chunk file {chunk} is missing"):
        TeacherStore(store).get("reasoning", "s4")
    for flags in ((), ("--quick",)):
        r = _verify(store, *flags)
        assert r.exit_code == 1 and "reasoning/s4" in r.output, r.output
    # The next build sees the sample as not done and rebuilds it, bit-identical.
    res = build(_cfg(tiny_models, data, store))
    assert res["already"] == 5 - len(group)
    assert _files(store) == _files(built)


def test_schema2_store_reads_and_says_it_has_no_checksums(built, tmp_path):
    store = _copy(built, tmp_path)
    for zj in store.rglob("zarr.json"):  # what today's (schema 2) code wrote: no checksums, version 2
        meta = json.loads(zj.read_text())
        attrs = meta.get("attributes", {})
        attrs.pop("checksums", None)
        if "drivekd" in attrs:
            attrs["drivekd"]["schema_version"] = 2
        zj.write_text(json.dumps(meta))
    st = TeacherStore(store)
    assert not st.checksummed and st.get("perception", "s0").maps[0].shape[0] > 0
    r = _verify(store)
    assert r.exit_code == 0 and "no checksums" in r.output and "rebuild" in r.output, r.output
    r = CliRunner().invoke(cache_cli, ["info", str(store)])
    assert r.exit_code == 0 and "no checksums" in r.output
    (store / "perception" / "samples" / "s1" / "attn" / "c" / "0" / "0").unlink()  # still never zeros
    with pytest.raises(StoreError, match="missing"):
        st.get("perception", "s1")


def _cli(main, args: list[str]) -> dict:
    """One drivekd CLI command, in this process: its exit status and console output (and a traceback
    in the output if it raised past its own error handling, which the tests below forbid)."""
    r = CliRunner().invoke(main, args)
    out = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        out += "".join(traceback.format_exception(r.exception))
    return {"rc": r.exit_code, "out": out}


def _forked(fn, result: Path) -> int:
    """Start fn() in a forked copy of this process (torch, transformers and drivekd already imported:
    no interpreter start-up, which a fresh `python -m drivekd.cli.*` pays) and return its pid; the
    child writes fn()'s JSON result to `result` (read by _joined) and never returns into pytest."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+ warns on fork() with threads (xdist's, zarr's loop)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            result.write_text(json.dumps(fn()))
            code = 0
        except BaseException:  # noqa: BLE001 - reported by the parent
            result.write_text(json.dumps({"child_error": traceback.format_exc()}))
        finally:
            os._exit(code)
    return pid


def _joined(pid: int, result: Path, timeout_s: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout_s  # a hung child (never expected) fails the test instead of hanging the suite
    while (status := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child {pid} still running after {timeout_s:.0f} s")
        time.sleep(0.05)
    if not result.is_file():
        pytest.fail(f"forked child {pid} ended without a result (wait status {status[1]})")
    got = json.loads(result.read_text())
    assert "child_error" not in got, got["child_error"]
    return got


# ----------------------------------------------------------------------------- one writer


@pytest.mark.slow
def test_two_builds_at_once_one_is_refused_naming_the_holder(tiny_models, data, built, tmp_path):
    out = tmp_path / "cache"
    # One role (the lock is per role; three would triple the teacher passes, not the race).
    args = ["build", "--teacher", "planning", "--model", str(tiny_models / "internvl-teacher"), "--data", str(data), "--out", str(out),
            "--no-progress", "--writers", "1"]

    def one_build():
        os.environ["DRIVEKD_FAULT_SLOW_WRITES"] = "0.1"  # the first build certainly still runs when the second starts
        return _cli(cache_cli, args)

    # two real processes (forked: each its own pid, the store lock's holder)
    results = [tmp_path / f"build{i}.json" for i in range(2)]
    pids = [_forked(one_build, r) for r in results]
    outs = [_joined(pid, r) for pid, r in zip(pids, results)]
    assert sorted(o["rc"] for o in outs) == [0, 2], outs
    winner, loser = (0, 1) if outs[0]["rc"] == 0 else (1, 0)
    err = outs[loser]["out"]
    assert f"being built by pid {pids[winner]}" in err and "Traceback" not in err, err
    assert _verify(out).exit_code == 0
    # the winner's store is the reference build's planning role (and the lock is gone)
    assert _files(out) == {k: v for k, v in _files(built).items() if k == "zarr.json" or k.startswith("planning/")}


def test_lock_is_refused_while_held_and_taken_over_when_its_holder_died(tmp_path):
    code = ("import sys, time; from drivekd.store.lock import StoreLock; StoreLock(sys.argv[1], ['planning']).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=rf"planning role of store {tmp_path} is being built by pid {p.pid} on host"):
            StoreLock(tmp_path, ["perception", "planning"]).acquire()
        assert not (tmp_path / ".locks" / "perception.lock").exists()  # all or none
        StoreLock(tmp_path, ["reasoning"]).acquire().release()  # other roles are free
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()  # else its pipe is left to the garbage collector (a ResourceWarning, an error here)
    assert json.loads((tmp_path / ".locks" / "planning.lock").read_text())["pid"] == p.pid  # left behind by kill -9
    with StoreLock(tmp_path, ["planning"]):  # stale: taken over
        assert json.loads((tmp_path / ".locks" / "planning.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".locks" / "planning.lock").exists()


def test_sample_marked_complete_with_arrays_missing_is_rebuilt(tiny_models, data, built, tmp_path):
    """What a racing build left behind: "complete", but no attn/zarr.json and only some chunks."""
    store = _copy(built, tmp_path)
    s = store / "reasoning" / "samples" / "s2" / "attn"
    group = _group(store, "reasoning", "s2")
    (s / "zarr.json").unlink()
    shutil.rmtree(s / "c" / "3")
    with pytest.raises(StoreError, match=r"s2.*array .*attn is missing"):
        TeacherStore(store).get("reasoning", "s2")
    res = build(_cfg(tiny_models, data, store))
    assert res["already"] == 5 - len(group)
    assert _files(store) == _files(built)


# ----------------------------------------------------------------------------- resume and alignment


def _records(data: Path) -> list[dict]:
    return json.loads(data.read_text())


@pytest.mark.slow
def test_resume_refuses_other_data_or_targets_unless_allowed(tiny_models, data, built, tmp_path):
    run = tmp_path / "run"
    steps = ("--max-steps", "3", "--save-every", "1", "--keep-last", "3")
    assert _train(tiny_models, data, built, run, *steps).exit_code == 0
    ck = ("--resume-from", str(run / "step-000001"))
    # The same data at another path and a copy of the store: the same content, accepted.
    moved = data.parent / "moved.json"  # beside it: its relative image paths still resolve
    shutil.copy(data, moved)
    copy = _copy(built, tmp_path)
    r = _train(tiny_models, moved, copy, run, *steps, *ck)
    assert r.exit_code == 0, r.output
    # Other data (one sample fewer).
    fewer = data.parent / "fewer.json"
    fewer.write_text(json.dumps(_records(data)[:4]))
    r = _train(tiny_models, fewer, built, run, *steps, *ck)
    assert r.exit_code == 2 and "--data content differs" in r.output and "--resume-allow-changed data" in r.output, r.output
    # Other targets: the perception role rebuilt with another encoding.
    cfg = _cfg(tiny_models, data, copy, encoding=Encoding("lossy", keepbits=3), overwrite=True)
    cfg.teachers = {"perception": cfg.teachers["perception"]}
    build(cfg)
    r = _train(tiny_models, data, copy, run, *steps, *ck)
    assert r.exit_code == 2 and "--cache holds other targets (perception: encoding, stored target values)" in r.output, r.output
    r = _train(tiny_models, data, copy, run, *steps, *ck, "--resume-allow-changed", "cache")
    assert r.exit_code == 0, r.output
    history = json.loads((run / "run.json").read_text())["history"]
    assert [h["from_step"] for h in history] == [0, 1, 1]
    assert [h["identity"]["allowed_changes"] for h in history] == [[], [], ["cache"]]
    assert history[0]["identity"]["cache"]["perception"]["encoding"]["mode"] == "lossless"
    assert history[2]["identity"]["cache"]["perception"]["encoding"]["mode"] == "lossy"
    r = _train(tiny_models, data, copy, run, *steps, *ck, "--resume-allow-changed", "weights")
    assert r.exit_code == 2 and "--resume-allow-changed: unknown kind(s) weights" in r.output


def test_edited_samples_stop_the_run_before_step_one_naming_all(tiny_models, data, built, tmp_path):
    recs = _records(data)
    for i in (1, 3):  # same explicit ids, other text
        recs[i]["messages"][0]["content"] += " Please answer briefly."
    edited = data.parent / "edited.json"
    edited.write_text(json.dumps(recs))
    run = tmp_path / "run"
    r = _train(tiny_models, edited, built, run, "--max-steps", "1")
    assert r.exit_code == 2 and "2 sample(s) do not match the teacher store's tokens: s1, s3" in r.output, r.output
    assert "first differing position" in r.output
    assert not (run / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- full disk


_CLONE_NEWNS = 0x00020000


def _in_small_fs(mount: Path, size: str, fn) -> dict:
    """Run fn() (returning JSON) in a forked child with its own mount namespace and a `size` tmpfs at
    `mount`: a real full disk, seen only by that child (`mount` below runs in it)."""
    mount.mkdir(parents=True, exist_ok=True)

    def child():
        if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNS) != 0:
            return {"skip": os.strerror(ctypes.get_errno())}
        # private first, so that nothing mounted here reaches the machine's namespace
        for cmd in (["mount", "--make-rprivate", "/"], ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                return {"skip": p.stderr.strip()}
        return fn()

    result = mount.parent / f"{mount.name}.result.json"
    got = _joined(_forked(child, result), result)
    if "skip" in got:
        pytest.skip(f"needs unshare(CLONE_NEWNS) and tmpfs mounts (root in a container) to fill a real disk: {got['skip']}")
    return got


def _remount(mount: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mount)], check=True, capture_output=True)


@pytest.mark.slow
def test_disk_full_during_build_is_one_clear_error_and_resumes(tiny_models, data, built, tmp_path):
    mnt, failed, keep = tmp_path / "mnt", tmp_path / "failed", tmp_path / "kept"
    args = ["build", "--teacher", "planning", "--model", str(tiny_models / "internvl-teacher"), "--data", str(data),
            "--out", str(mnt / "cache"), "--no-progress", "--writers", "1"]

    def scenario():
        first = _cli(cache_cli, args)
        shutil.copytree(mnt / "cache", failed)
        _remount(mnt, "size=64m")
        second = _cli(cache_cli, args)  # the same build again, in the same process: the full disk released its lock
        shutil.copytree(mnt / "cache", keep)
        return {"first": first, "second": second}

    got = _in_small_fs(mnt, "160k", scenario)
    out = got["first"]["out"]
    assert got["first"]["rc"] == 2 and "disk full while writing the teacher store" in out and "MiB free" in out, out
    assert "Traceback" not in out
    # What the full disk left: some samples not complete, none marked complete with anything missing.
    problems = TeacherStore(failed).verify("planning")
    assert problems and all(p.message in ("writing", "missing", "incomplete") for p in problems), [str(p) for p in problems]
    assert got["second"]["rc"] == 0, got["second"]["out"]
    assert _files(keep) == {k: v for k, v in _files(built).items() if k == "zarr.json" or k.startswith("planning/")}


@pytest.mark.slow
def test_disk_full_during_checkpoint_save_is_one_clear_error(tiny_models, data, built, tmp_path):
    mnt = tmp_path / "mnt"

    def scenario():
        r = _train(tiny_models, data, built, mnt / "run", "--max-steps", "1", "--save-every", "1")
        return {"rc": r.exit_code, "out": r.output + ("" if isinstance(r.exception, (SystemExit, type(None)))
                                                      else "".join(traceback.format_exception(r.exception))),
                "left": sorted(os.listdir(mnt / "run"))}

    got = _in_small_fs(mnt, "400k", scenario)
    out = got["out"]
    assert got["rc"] == 2 and "could not save checkpoint step-000001" in out and "disk full" in out and "MiB free" in out, out
    assert "Traceback" not in out and not any(".tmp-" in f for f in got["left"]), got  # nothing half-written left


@pytest.mark.slow
def test_full_or_read_only_disk_at_start_up_is_one_clear_error(tiny_models, data, built, tmp_path):
    """Issue 24: the disk is already full when `cache build` or `verify --repair` starts (the lock is
    their first write), or the store's folder is read-only: one line naming the path and the free space."""
    mnt = tmp_path / "mnt"
    build_args = ["build", "--teacher", "planning", "--model", str(tiny_models / "internvl-teacher"), "--data", str(data),
                  "--no-progress", "--out"]

    def scenario():
        shutil.copytree(built, mnt / "store")
        with open(mnt / "fill", "wb", buffering=0) as fh:  # fill the disk
            try:
                while True:
                    fh.write(bytes(1 << 16))
            except OSError:
                pass
        full = _cli(cache_cli, [*build_args, str(mnt / "new")])
        repair = _cli(cache_cli, ["verify", "--repair", str(mnt / "store")])
        _remount(mnt, "ro")
        return [full, repair, _cli(cache_cli, [*build_args, str(mnt / "ro")])]

    got = _in_small_fs(mnt, "32m", scenario)
    out = "".join(r["out"] for r in got)
    assert [r["rc"] for r in got] == [2, 2, 2] and "Traceback" not in out and "Errno" not in out, out
    assert f"could not write the store lock (or its folder) {mnt}/new/.locks/planning.lock (disk full; 0.0 MiB free there)" in out, out
    assert f"could not write the store lock (or its folder) {mnt}/store/.locks/perception.lock (disk full; 0.0 MiB free there)" in out, out
    assert f"could not write the store lock (or its folder) {mnt}/ro (Read-only file system;" in out and "MiB free there" in out, out
