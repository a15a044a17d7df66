"""Safe-SAIL release layout: import of the real samples, export, lossless round trips, bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neurondb_helpers import make_run
from safesail.errors import UserError
from safesail.neurondb import NeuronDB
from safesail.neurondb.approx_quantile import approximate_upper_quantile
from safesail.neurondb.build import build_db
from safesail.neurondb.cli import run_db_command
from safesail.neurondb.export_safesail import export_release
from safesail.neurondb.import_safesail import import_release, read_release
from safesail.rundir import RunDir

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "safesail_samples"
N, K = 200_000, 300


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def quantile_file_for(indices: torch.Tensor, path: Path, k: int = K, seed: int = 0) -> dict[int, np.ndarray]:
    """A quantile file aligned with `indices` (duplicates get identical columns); returns per-latent tops."""
    rng = np.random.default_rng(seed)
    per = {}
    for idx in sorted(set(indices.tolist())):
        per[idx] = (np.sort(rng.gamma(2.0, 1.0, k)).astype(np.float32),
                    np.sort(rng.uniform(-0.1, 0.0, k)).astype(np.float32))
    top = np.stack([per[i][0] for i in indices.tolist()], axis=1)
    bot = np.stack([per[i][1] for i in indices.tolist()], axis=1)
    torch.save({"top_neuron_activations": torch.from_numpy(top), "bottom_neuron_activations": torch.from_numpy(bot)},
               path)
    return {i: v[0] for i, v in per.items()}


@pytest.fixture
def release(tmp_path):
    d = tmp_path / "release"
    (d / "data" / "neuron_db").mkdir(parents=True)
    (d / "data" / "activation" / "indices").mkdir(parents=True)
    (d / "data" / "activation" / "quantiles").mkdir(parents=True)
    shutil.copy(SAMPLES / "en_db.sample.json", d / "data" / "neuron_db" / "en_db.json")
    shutil.copy(SAMPLES / "indices_layer35.pt", d / "data" / "activation" / "indices" / "indices_layer35.pt")
    indices = torch.load(SAMPLES / "indices_layer35.pt")
    tops = quantile_file_for(indices, d / "data" / "activation" / "quantiles" / "quantile_layer35.pt")
    return d, indices, tops


def _files(d: Path):
    return (d / "data" / "neuron_db" / "en_db.json", {35: d / "data/activation/indices/indices_layer35.pt"},
            {35: d / "data/activation/quantiles/quantile_layer35.pt"})


def test_approximate_quantile_matches_the_empirical_one():
    rng = np.random.default_rng(1)
    acts = rng.exponential(1.0, size=(3, 50_000))
    top = -np.sort(-acts, axis=1)[:, :1000].T  # [k, n], descending (order must not matter)
    got = approximate_upper_quantile(top, 0.999, 50_000)
    want = np.quantile(acts, 0.999, axis=1)
    assert np.allclose(got, want, rtol=0.02)
    # the point q lands on exactly: the 51st largest of 50,000 (cumulative probability 0.999)
    assert np.allclose(got, np.sort(acts, axis=1)[:, -51], rtol=1e-6)


def test_import_of_the_samples_gives_exactly_their_entries(release, tmp_path):
    d, indices, tops = release
    sample = json.loads((SAMPLES / "en_db.sample.json").read_text(encoding="utf-8"))
    db_path = tmp_path / "release.sqlite"
    s = import_release(db_path, read_release(*_files(d), {}), "qwen2.5-3b-instruct", num_tokens=N)
    assert s["entries"] == 35 and s["layers"] == [0, 8, 17, 26, 35]
    assert s["latents_with_quantiles"] == len(set(indices.tolist())) == 528
    with NeuronDB.open(db_path) as db:
        assert db.model_info()["source"] == "safesail-release"
        for key, entry in sample.items():
            layer, idx = map(int, key.split("_"))
            got = db.lookup(f"layers.{layer}.mlp_out", [idx])[idx]
            assert (got["explanation"], got["score"], got["tags"]) == (
                entry["explanation"], entry["correlation_score"], entry["tag_list"])
        assert db.lookup("layers.8.mlp_out", [4247])[4247]["explanation"] == "***"
        assert db.lookup("layers.0.mlp_out", [12353])[12353]["explanation"] is None
        assert db.lookup("layers.8.mlp_out", [710])[710]["tags"] == ["violence", "terror"]
        assert {h["index"] for h in db.search(domain="politics")} == {4247, 19586, 5397}
        assert [(h["layer"], h["index"]) for h in db.search("枪毙")] == [(0, 2139)]  # inside a CJK run
        assert {h["index"] for h in db.search("weapon*")} == {14830, 7888, 4993}  # prefix
        assert db.search('C++ "quote" * NEAR(') == []  # user punctuation is not FTS syntax
        ids, q = db.normalizers("layers.35.mlp_out")
        assert ids.tolist() == sorted(set(indices.tolist()))
        # Safe-SAIL's point: q = 0.999 of N = 200,000 is the (N - 0.999 N + 1) = 201st largest value
        want = torch.tensor([tops[i][K - 201] for i in ids.tolist()])
        assert torch.allclose(q, want, rtol=1e-6)
        saes = {x["layer"]: x for x in db.saes()}
        assert saes[35]["layout"] == "safesail-ckpt" and saes[35]["k"] == 200 and saes[35]["arch"] == "topk"
        st = db.stats()
        assert st["totals"]["explained"] == 35
        assert st["totals"]["tagged"] == sum(1 for e in sample.values() if e["tag_list"])

    out = tmp_path / "export"
    with NeuronDB.open(db_path) as db:
        export_release(db, out, score_cut=0.2)
    # byte for byte the sample, and the exact indices (order and duplicates) and tables
    assert (out / "en_db.json").read_bytes() == (SAMPLES / "en_db.sample.json").read_bytes()
    assert torch.equal(torch.load(out / "indices_layer35.pt"), indices)
    q_in = torch.load(d / "data/activation/quantiles/quantile_layer35.pt")
    q_out = torch.load(out / "quantile_layer35.pt")
    for key in ("top_neuron_activations", "bottom_neuron_activations"):
        assert torch.equal(q_out[key], q_in[key])
    assert len((out / "neurons.jsonl").read_text().splitlines()) == 35 + 528 - 3


def test_built_db_round_trips_through_the_release_layout(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    rd = RunDir.from_cfg(cfg)
    make_run(rd.root)
    build_db(cfg, rd)
    first, second = tmp_path / "e1", tmp_path / "e2"
    with NeuronDB.open(rd.neuron_db) as db:
        export_release(db, first, score_cut=0.2, indices_mode="all")
    rel = read_release(first / "en_db.json", {1: first / "indices_layer1.pt", 3: first / "indices_layer3.pt"},
                       {1: first / "quantile_layer1.pt", 3: first / "quantile_layer3.pt"}, {})
    import_release(tmp_path / "copy.sqlite", rel, "tiny", num_tokens=8192)
    with NeuronDB.open(tmp_path / "copy.sqlite") as db:
        export_release(db, second, score_cut=0.2)
    assert json.loads((second / "en_db.json").read_text()) == json.loads((first / "en_db.json").read_text())
    assert (second / "en_db.json").read_bytes() == (first / "en_db.json").read_bytes()
    for layer in (1, 3):
        assert torch.equal(torch.load(second / f"indices_layer{layer}.pt"), torch.load(first / f"indices_layer{layer}.pt"))
        a, b = torch.load(first / f"quantile_layer{layer}.pt"), torch.load(second / f"quantile_layer{layer}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # columns are the built tables, ascending along k
        top = a["top_neuron_activations"]
        assert top.shape == (8, 12) and torch.all(top[1:] >= top[:-1])


def test_cli_import_from_a_release_folder(release, smoke_cfg, tmp_path, capsys):
    d, _, _ = release
    cfg = smoke_cfg()
    db_path = tmp_path / "cli.sqlite"
    run_db_command(cfg, ["import", "--from", str(d), "--db", str(db_path)])
    assert "imported 35 entries" in capsys.readouterr().out
    run_db_command(cfg, ["search", "explosives", "--domain", "terror", "--db", str(db_path)])
    out = capsys.readouterr().out
    assert "8_4993" in out and "17_7888" in out
    run_db_command(cfg, ["show", "35", "655", "--db", str(db_path)])
    assert "Pinyin" in capsys.readouterr().out
    run_db_command(cfg, ["stats", "--json", "--db", str(db_path)])
    st = json.loads(capsys.readouterr().out)
    assert st["model"] == "qwen2.5-3b-instruct" and st["per_domain"]["politics"] == 3


def _fake_ckpt(path: Path, n: int = 20480, d: int = 8, theta: bool = False, bad: bool = False):
    sd = {"pre_encoder_bias._bias_reference": torch.zeros(1, d), "encoder.weight": torch.zeros(1, n, d),
          "encoder.bias": torch.zeros(1, n if not bad else n + 1)}
    if theta:
        sd["encoder.theta"] = torch.zeros(1, n)
    torch.save(sd, path)


def test_checkpoints_are_checked_and_recorded(release, tmp_path):
    d, _, _ = release
    ck = tmp_path / "ckpt_layer35.pt"
    _fake_ckpt(ck)
    en, idx, qs = _files(d)
    import_release(tmp_path / "a.sqlite", read_release(en, idx, qs, {35: ck}), "qwen2.5-3b-instruct")
    with NeuronDB.open(tmp_path / "a.sqlite") as db:
        sae = [s for s in db.saes() if s["layer"] == 35][0]
        assert (sae["layout"], sae["path"], sae["width"], sae["d_in"], sae["arch"]) == (
            "safesail-ckpt", str(ck.resolve()), 20480, 8, "topk")
    _fake_ckpt(ck, bad=True)
    with pytest.raises(UserError, match="encoder.bias must have shape"):
        read_release(en, idx, qs, {35: ck})
    _fake_ckpt(ck, n=1000)
    with pytest.raises(UserError, match="only 1000 latents"):
        read_release(en, idx, qs, {35: ck})


def test_bad_release_files_leave_the_db_untouched(release, tmp_path):
    d, indices, _ = release
    en, idx, qs = _files(d)
    db_path = tmp_path / "keep.sqlite"
    import_release(db_path, read_release(en, idx, qs, {}), "qwen2.5-3b-instruct")
    before = _sha(db_path)

    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"layer": 0, "index": 1}]))
    with pytest.raises(UserError, match="not a Safe-SAIL neuron DB"):
        read_release(other, {}, {}, {})
    other.write_text(json.dumps({"0_1": {"explanation": "x", "score": 0.3, "tag_list": []}}))
    with pytest.raises(UserError, match="exactly the fields"):
        read_release(other, {}, {}, {})
    other.write_text(json.dumps({"layer0-1": {"explanation": "x", "correlation_score": 0.3, "tag_list": []}}))
    with pytest.raises(UserError, match="not of the form"):
        read_release(other, {}, {}, {})
    other.write_text('{"0_1": {"explanation": "a", "correlation_score": 0.3, "tag_list": []},'
                     ' "0_1": {"explanation": "b", "correlation_score": 0.4, "tag_list": []}}')
    with pytest.raises(UserError, match="key '0_1' twice"):
        read_release(other, {}, {}, {})
    other.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_release(other, {}, {}, {})

    short = tmp_path / "quantile_layer35.pt"
    quantile_file_for(indices[:-5], short)
    with pytest.raises(UserError, match="1373 columns but .* lists 1378 indices"):
        read_release(en, idx, {35: short}, {})
    with pytest.raises(UserError, match="no matching indices_layer35.pt"):
        read_release(en, {}, qs, {})
    notidx = tmp_path / "indices_layer35.pt"
    torch.save(torch.rand(3, 4), notidx)
    with pytest.raises(UserError, match="not a Safe-SAIL indices file"):
        read_release(en, {35: notidx}, {}, {})

    with pytest.raises(UserError, match="holds the neuron DB of model 'qwen2.5-3b-instruct', not 'tiny'"):
        import_release(db_path, read_release(en, idx, qs, {}), "tiny")
    assert _sha(db_path) == before
