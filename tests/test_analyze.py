"""drivekd-analyze: each pre-study equals a direct computation from eager attention and
output_hidden_states of the same tiny model; the CLI runs, resumes after kill -9, shards, and
refuses bad input with a clear message."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from drivekd.analyze import AnalyzeConfig, analyze
from drivekd.analyze.aggregate import relative_spec, suggest
from drivekd.analyze.sampling import rewordings, select
from drivekd.data import load_samples
from drivekd.errors import ConfigError, DataError
from drivekd.families import Family, load_model
from drivekd.roles import CAPABILITIES, IGNORE_INDEX

TAUS = (1.0, 0.5, 3.0)
TOL = 1e-5


@pytest.fixture(scope="module")
def rw_data(demo_data, tmp_path_factory):
    """The demo questions with explicit ids, plus two rewordings marked with `rewording_of`."""
    recs = json.loads((demo_data / "train.json").read_text())
    for i, r in enumerate(recs):
        r["id"] = f"q{i}"
    extra = []
    for i in (0, 4):
        r = json.loads(json.dumps(recs[i]))
        user = r["messages"][0]["content"]
        tags = user.count("<image>")
        r["messages"][0]["content"] = "<image>" * tags + "In this driving scene, " + user.replace("<image>", "")
        r["id"], r["rewording_of"] = f"q{i}-rw", f"q{i}"
        extra.append(r)
    d = tmp_path_factory.mktemp("rw")
    (d / "train.json").write_text(json.dumps(recs + extra))
    return d / "train.json"


@pytest.fixture(scope="module")
def analysed(tiny_models, demo_data, rw_data, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("analysis")
    cfg = AnalyzeConfig(model=tiny_models / "internvl-teacher", data=rw_data, images=demo_data, out=out, temperatures=TAUS,
                        progress=False)
    res = analyze(cfg)
    return out, json.loads((out / "analysis.json").read_text()), res


# ------------------------------------------------------------------ the independent computation

def _cos(a, b):
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))


def _direct(tiny_models, demo_data, rw_data, ids):
    """Per sample, straight from eager attention and output_hidden_states (numpy, float64)."""
    path = tiny_models / "internvl-teacher"
    fam = Family.from_pretrained(path)
    model = load_model(path, capture=False, attn="eager").eval()
    by_id = {s.id: s for s in load_samples(rw_data, demo_data)}
    delims = [fam.tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>")]
    out = {}
    for sid in ids:
        inp = fam.build_inputs([by_id[sid]])
        lay = inp.layouts[0]
        with torch.no_grad():
            o = model(**inp.tensors, output_hidden_states=True, output_attentions=True)
        H = np.stack([h[0].double().numpy() for h in o.hidden_states])  # (L+1, T, D)
        A = np.stack([a[0].double().mean(0).numpy() for a in o.attentions])  # (L, T, T) head mean
        ids_ = lay.input_ids.numpy()
        vis, txt = lay.vision.numpy(), lay.text.numpy()
        L, T = A.shape[0], A.shape[1]
        P = max(t for t in range(T) if vis[t] or ids_[t] in delims) + 1
        rows = [t for t in range(P, T) if txt[t]]
        last = max(t for t in range(T) if txt[t])
        lab = lay.labels.numpy()
        ans = [t for t in range(T - 1) if lab[t + 1] != IGNORE_INDEX]
        conf = []
        for tau in TAUS:
            vals = []
            for t in ans:
                z = o.logits[0, t].double().numpy() / tau
                p = np.exp(z - z.max())
                p /= p.sum()
                top = np.sort(p)[::-1][:10]
                vals.append([top[0], top.sum(), top[0] - top[1:].mean()])
            conf.append(np.mean(vals, 0))
        out[sid] = {
            "cap": by_id[sid].capability, "images": by_id[sid].group_key,
            "adjacent": [np.mean([_cos(H[l, t], H[l - 1, t]) for t in range(T)]) for l in range(1, L + 1)],
            "vision_text": [_cos(H[l][vis].mean(0), H[l][txt].mean(0)) for l in range(L + 1)],
            "last": H[:, last], "profile": np.stack([A[k][rows][:, :P].mean(0) for k in range(L)]),
            "conf": np.array(conf),
        }
    return out


@pytest.mark.slow
def test_each_analysis_equals_a_direct_computation(analysed, tiny_models, demo_data, rw_data):
    out, a, _ = analysed
    rw = {"q0-rw": "q0", "q4-rw": "q4"}
    d = _direct(tiny_models, demo_data, rw_data, a["sample_ids"])
    orig = [s for s in a["sample_ids"] if s not in rw]
    L = a["num_layers"]
    assert a["rewordings"] == 2 and a["questions"] == 12 and set(a["sample_ids"]) == {f"q{i}" for i in range(12)} | set(rw)

    # 1. representation view
    np.testing.assert_allclose(a["representation"]["adjacent"], np.mean([d[s]["adjacent"] for s in orig], 0), atol=TOL)
    np.testing.assert_allclose(a["representation"]["vision_text"], np.mean([d[s]["vision_text"] for s in orig], 0), atol=TOL)
    for c in CAPABILITIES:
        sub = [s for s in orig if d[s]["cap"] == c]
        np.testing.assert_allclose(a["representation"]["by_capability"][c]["adjacent"], np.mean([d[s]["adjacent"] for s in sub], 0), atol=TOL)

    # 2. capability intra-consistency: per image the centre over that image's questions of c
    groups = {}
    for s in orig:
        groups.setdefault(d[s]["images"], []).append(s)
    for c in CAPABILITIES:
        centres = [np.mean([d[s]["last"] for s in g if d[s]["cap"] == c], 0) for g in groups.values()
                   if any(d[s]["cap"] == c for s in g)]
        want = [np.mean([_cos(x[l], y[l]) for x, y in itertools.combinations(centres, 2)]) for l in range(L + 1)]
        assert a["intra_consistency"][c]["n_images"] == len(centres) >= 2
        np.testing.assert_allclose(a["intra_consistency"][c]["cosine"], want, atol=TOL)

    # 3. dispersion across questions of one image, and under rewording
    def disp(key, n):
        per = [[np.mean([1 - _cos(d[x][key][l], d[y][key][l]) for x, y in itertools.combinations(g, 2)]) for l in range(n)]
               for g in groups.values() if len(g) > 1]
        return np.mean(per, 0)

    np.testing.assert_allclose(a["dispersion"]["hidden"], disp("last", L + 1), atol=TOL)
    np.testing.assert_allclose(a["dispersion"]["attention"], disp("profile", L), atol=TOL)
    assert max(a["dispersion"]["attention"]) > 0  # the suffix rows differ between questions
    np.testing.assert_allclose(a["dispersion"]["rewording"]["hidden"],
                               np.mean([[1 - _cos(d[r]["last"][l], d[o]["last"][l]) for l in range(L + 1)] for r, o in rw.items()], 0), atol=TOL)
    np.testing.assert_allclose(a["dispersion"]["rewording"]["attention"],
                               np.mean([[1 - _cos(d[r]["profile"][k], d[o]["profile"][k]) for k in range(L)] for r, o in rw.items()], 0), atol=TOL)

    # 4. output confidence at each temperature
    want = np.mean([d[s]["conf"] for s in orig], 0)  # (n_tau, 3)
    for j, f in enumerate(("top1", "top10_mass", "margin")):
        np.testing.assert_allclose(a["confidence"]["all"][f], want[:, j], atol=TOL)
    assert a["confidence"]["temperatures"] == list(TAUS)
    assert "lost in extraction" in a["definitions"]["confidence"]


def test_outputs_figures_and_suggestion(analysed):
    out, a, res = analysed
    for name in ("representation.png", "intra_consistency.png", "dispersion.png", "confidence.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(a["figures"].values()) == {"representation.png", "intra_consistency.png", "dispersion.png", "confidence.png"}
    s = a["suggestion"]
    assert s["rule"] and 'layers = "perception=' in s["train_toml"]
    # The suggestion follows its rule on the measured numbers.
    L = a["num_layers"]
    vt = a["representation"]["vision_text"]
    assert s["layers"]["perception"] == [int(np.argmax(vt[1:]))]
    pc = a["intra_consistency"]["planning"]["cosine"]
    assert pc[s["layers"]["planning"][0] + 1] == max(pc[1:L])


def _analysis(L, vt_peak, plan_peak, hid=0.5, att=0.1):
    vt = [0.1] * (L + 1)
    vt[vt_peak + 1] = 0.9
    pc = [0.2] * (L + 1)
    pc[plan_peak + 1] = 0.8
    return {"representation": {"vision_text": vt}, "intra_consistency": {"planning": {"cosine": pc}},
            "dispersion": {"hidden": [hid] * (L + 1), "attention": [att] * L}}


def test_suggestion_rule_recovers_the_paper_recipe():
    s = suggest(_analysis(28, 0, 26), 28)
    assert s["specs"] == {"perception": "0", "reasoning": "0..L-2", "planning": "L-2"} and s["signal"] == "attention"
    assert 'layers = "perception=0;reasoning=0..L-2;planning=L-2"' in s["train_toml"]
    # The last decoder layer is never the planning layer; hidden states steadier -> said so.
    s = suggest(_analysis(6, 2, 5, hid=0.1, att=0.5), 6)
    assert s["layers"]["planning"] == [4] and s["layers"]["reasoning"] == [2, 3, 4] and s["signal"] == "hidden"
    assert relative_spec(1, 6) == "1" and relative_spec(4, 6) == "L-2"


def test_rewordings_are_checked(rw_data, demo_data, tmp_path):
    samples = load_samples(rw_data, demo_data)
    assert rewordings(samples) == {"q0-rw": "q0", "q4-rw": "q4"}
    sel = select(samples, 2, per_image=8)
    assert sum(len(sel.originals(g)) for g in sel.groups) == 2
    recs = json.loads(rw_data.read_text())
    for patch, msg in [({"rewording_of": "nope"}, r"sample q0-rw: `rewording_of` names 'nope', which is no sample id"),
                       ({"rewording_of": "q1"}, r"sample q0-rw: a rewording must ask about the same images|must keep the capability"),
                       ({"rewording_of": "q4-rw"}, r"sample q0-rw: `rewording_of` names q4-rw, itself a rewording")]:
        bad = [dict(r, **patch) if r["id"] == "q0-rw" else r for r in recs]
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=msg):
            rewordings(load_samples(p, demo_data))


def test_bad_settings_name_the_flag(tiny_models, rw_data, demo_data, tmp_path):
    m = tiny_models / "internvl-teacher"
    for kw, msg in [({"per_image": 0}, "--per-image"), ({"samples": 0}, "--samples"), ({"temperatures": (1.0, 0.0)}, "--temperatures"),
                    ({"model": tmp_path / "none"}, "--model"), ({"data": tmp_path / "none.json"}, "--data")]:
        with pytest.raises(ConfigError, match=msg):
            AnalyzeConfig(**{"model": m, "data": rw_data, "out": tmp_path / "o", "images": demo_data, **kw})


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "drivekd.cli.analyze", *map(str, args), "--no-progress"], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def test_cli_errors_are_one_line(tiny_models, rw_data, demo_data, tmp_path):
    from click.testing import CliRunner

    from drivekd.cli.analyze import main as analyze_cli

    m, base = tiny_models / "internvl-teacher", ["--data", str(rw_data), "--out", str(tmp_path / "o"), "--no-progress"]
    for args, msg in [(["--model", str(tmp_path / "missing")], "error: --model"),
                      (["--model", str(m), "--temperatures", "1,x"], "error: --temperatures"),
                      (["--model", str(m), "--per-image", "0"], "error: --per-image"),
                      (["--model", str(m), "--samples", "-3"], "error: --samples")]:
        r = CliRunner().invoke(analyze_cli, args + base)
        assert r.exit_code == 2 and msg in r.output and isinstance(r.exception, SystemExit), r.output


@pytest.mark.slow
def test_cli_killed_run_resumes_to_the_same_analysis(analysed, tiny_models, rw_data, demo_data, tmp_path):
    _, want, _ = analysed
    out = tmp_path / "a"
    args = ["--model", tiny_models / "internvl-teacher", "--data", rw_data, "--images", demo_data, "--out", out,
            "--temperatures", ",".join(f"{t:g}" for t in TAUS)]
    p = _cli(*args, env={"DRIVEKD_FAULT_KILL_AFTER": "5"})
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list((out / "samples").glob("*.pt"))) == 5 and not (out / "analysis.json").exists()
    assert not list((out / "samples").glob(".*tmp*"))  # only whole files
    # The same command again, in this process (the kill is what needs a process of its own).
    from click.testing import CliRunner

    from drivekd.cli.analyze import main as analyze_cli

    r = CliRunner().invoke(analyze_cli, [*map(str, args), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "9 computed, 5 already done" in r.output and "perception=" in r.output
    got = json.loads((out / "analysis.json").read_text())
    for k in ("representation", "intra_consistency", "dispersion", "confidence", "suggestion"):
        assert json.dumps(got[k]) == json.dumps(want[k])
    # Partial results of other settings are refused, naming --out and the way out.
    cfg = AnalyzeConfig(model=tiny_models / "internvl-teacher", data=rw_data, images=demo_data, out=out, temperatures=(1.0, 2.0))
    with pytest.raises(ConfigError, match=r"--out .* another analysis \(different temperatures\).*--overwrite"):
        analyze(cfg)


def test_unreadable_image_names_the_sample(tiny_models, rw_data, demo_data, tmp_path):
    recs = json.loads(rw_data.read_text())[:2]
    recs[1]["images"] = ["missing.png"] * len(recs[1]["images"])
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(recs))
    cfg = AnalyzeConfig(model=tiny_models / "internvl-teacher", data=p, images=demo_data, out=tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"sample q1: cannot read image .*missing.png.*drop sample q1 from --data"):
        analyze(cfg)
