"""Issue 16, items 9-12: Safe-SAIL's real release files (one-line ASCII JSON, indices without quantile
tables, masked explanations, en + cn side by side, layers the model lacks, Git LFS pointers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from safesail.errors import UserError
from safesail.neurondb import NeuronDB
from safesail.neurondb.cli import run_db_command

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "safesail_samples"
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 163985\n")


def _sample() -> dict:
    return json.loads((SAMPLES / "en_db.sample.json").read_text(encoding="utf-8"))


def _cn(sample: dict) -> dict:
    """A cn_db.json of the same neurons (Chinese explanations; masked and null ones kept as they are)."""
    return {k: {"explanation": v["explanation"] if v["explanation"] in (None, "***") else f"中文解释 {k}：毙",
                "correlation_score": v["correlation_score"], "tag_list": v["tag_list"]}
            for k, v in sample.items()}


@pytest.fixture
def real_release(tmp_path):
    """The release as published: `json.dumps(d)` (one line, ASCII escapes, keys in their own unsorted order),
    indices without quantile tables."""
    d = tmp_path / "Safe-SAIL"
    (d / "data" / "neuron_db").mkdir(parents=True)
    (d / "data" / "activation" / "indices").mkdir(parents=True)
    sample = _sample()
    keys = sorted(sample, key=lambda k: (hash(k) % 7, k))  # not sorted by layer and index
    en = {k: sample[k] for k in keys}
    (d / "data" / "neuron_db" / "en_db.json").write_text(json.dumps(en))
    (d / "data" / "neuron_db" / "cn_db.json").write_text(json.dumps(_cn(en)))
    shutil.copy(SAMPLES / "indices_layer35.pt", d / "data" / "activation" / "indices" / "indices_layer35.pt")
    return d


def _import(cfg, release: Path, db: Path, *extra: str):
    run_db_command(cfg, ["import", "--from", str(release), "--db", str(db), "--model", "qwen2.5-3b-instruct", *extra])


def _import_and_export(cfg, release: Path, tmp_path: Path) -> Path:
    """Import the release into tmp_path/release.sqlite, export it (no JSONL) to tmp_path/export; returns that."""
    db = tmp_path / "release.sqlite"
    _import(cfg, release, db)
    out = tmp_path / "export"
    run_db_command(cfg, ["export", "--db", str(db), "--out", str(out), "--no-jsonl"])
    return out


def test_export_after_import_is_the_release_byte_for_byte(real_release, smoke_cfg, tmp_path):
    out = _import_and_export(smoke_cfg(), real_release, tmp_path)
    for name in ("en_db.json", "cn_db.json"):
        src = (real_release / "data" / "neuron_db" / name).read_bytes()
        assert src.isascii() and b"\n" not in src
        assert (out / name).read_bytes() == src


def test_indices_imported_without_tables_are_exported(real_release, smoke_cfg, tmp_path):
    out = _import_and_export(smoke_cfg(), real_release, tmp_path)
    # the release's indices come without quantile tables; they are exported as imported (order, duplicates)
    assert torch.equal(torch.load(out / "indices_layer35.pt"), torch.load(SAMPLES / "indices_layer35.pt"))
    assert not (out / "quantile_layer35.pt").exists()


def test_our_runs_keep_the_readable_layout(smoke_cfg, tmp_path):
    from neurondb_helpers import make_run
    from safesail.neurondb.build import build_db
    from safesail.rundir import RunDir

    cfg = smoke_cfg()
    rd = RunDir.from_cfg(cfg)
    make_run(rd.root)
    build_db(cfg, rd)
    out = tmp_path / "export"
    run_db_command(cfg, ["export", "--out", str(out), "--no-jsonl"])
    text = (out / "en_db.json").read_text(encoding="utf-8")
    entries = json.loads(text)
    assert text == json.dumps(entries, indent=1, ensure_ascii=False)
    keys = [tuple(map(int, k.split("_"))) for k in entries]
    assert keys == sorted(keys)


def test_masked_explanations_are_searchable(real_release, smoke_cfg, tmp_path, capsys):
    cfg = smoke_cfg()
    db = tmp_path / "release.sqlite"
    _import(cfg, real_release, db)
    sample = _sample()
    masked = {k for k, v in sample.items() if v["explanation"] == "***"}
    starred = {k for k, v in sample.items() if v["explanation"] and "*" in v["explanation"]}
    assert len(masked) == 3 and starred > masked
    capsys.readouterr()
    for query, want in (("***", masked), ("*", starred)):
        run_db_command(cfg, ["search", query, "--db", str(db), "--json", "--limit", "100"])
        hits = json.loads(capsys.readouterr().out)
        assert {f"{h['layer']}_{h['index']}" for h in hits} == want
    with NeuronDB.open(db) as d:
        assert {h["index"] for h in d.search("*** ", domain="politics")} == {4247, 19586, 5397}
        assert [h["index"] for h in d.search("weapon* ***")] == []  # both words must occur


def test_en_and_cn_explanations_are_kept_side_by_side(real_release, smoke_cfg, tmp_path, capsys):
    cfg = smoke_cfg()
    db = tmp_path / "both.sqlite"
    en_file = real_release / "data" / "neuron_db" / "en_db.json"
    cn_file = real_release / "data" / "neuron_db" / "cn_db.json"
    run_db_command(cfg, ["import", "--en-db", str(en_file), "--db", str(db)])
    run_db_command(cfg, ["import", "--cn-db", str(cn_file), "--db", str(db)])  # a second import, later
    sample = _sample()
    with NeuronDB.open(db) as d:
        key = next(k for k, v in sample.items() if v["explanation"] not in (None, "***"))
        layer, idx = map(int, key.split("_"))
        rec = d.latent(f"layers.{layer}.mlp_out", idx)
        assert rec["explanation"] == sample[key]["explanation"]          # English stays the primary one
        assert rec["explanations"] == {"en": sample[key]["explanation"], "cn": _cn(sample)[key]["explanation"]}
        assert d.lookup(f"layers.{layer}.mlp_out", [idx])[idx]["explanation"] == sample[key]["explanation"]
        assert (layer, idx) in {(h["layer"], h["index"]) for h in d.search("中文解释", limit=100)}
    capsys.readouterr()
    run_db_command(cfg, ["show", str(layer), str(idx), "--db", str(db)])
    out = capsys.readouterr().out
    assert f"explanation (en): {sample[key]['explanation'][:30]}" in out and "explanation (cn): 中文解释" in out
    # --lang picks languages from a release folder
    only_cn = tmp_path / "cn.sqlite"
    _import(cfg, real_release, only_cn, "--lang", "cn")
    with NeuronDB.open(only_cn) as d:
        assert d.latent(f"layers.{layer}.mlp_out", idx)["explanations"] == {"cn": _cn(sample)[key]["explanation"]}
    with pytest.raises(UserError, match="--lang names jp"):
        _import(cfg, real_release, tmp_path / "x.sqlite", "--lang", "jp")


def test_layers_the_model_lacks_are_refused(real_release, smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    idx40 = tmp_path / "indices_layer40.pt"
    shutil.copy(SAMPLES / "indices_layer35.pt", idx40)
    db = tmp_path / "r.sqlite"
    with pytest.raises(UserError, match=r"indices_layer40.pt is for layer 40, but model qwen2.5-3b-instruct has "
                                        r"36 layers \(0-35\)"):
        run_db_command(cfg, ["import", "--indices", str(idx40), "--db", str(db), "--model", "qwen2.5-3b-instruct"])
    assert not db.exists()
    en = tmp_path / "en_db.json"
    en.write_text(json.dumps({"36_5": {"explanation": "x", "correlation_score": 0.5, "tag_list": []}}))
    with pytest.raises(UserError, match="has neurons on layer 36, but model qwen2.5-3b-instruct has 36 layers"):
        run_db_command(cfg, ["import", "--en-db", str(en), "--db", str(db)])
    # the run's own model counts too: the smoke model (tiny) has 4 layers
    with pytest.raises(UserError, match="for layer 35, but model tiny has 4 layers"):
        run_db_command(cfg, ["import", "--indices", str(SAMPLES / "indices_layer35.pt"), "--db", str(db),
                             "--model", "tiny"])


def test_git_lfs_pointer_files_are_named_as_such(real_release, smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    pointer = real_release / "data" / "activation" / "indices" / "indices_layer35.pt"
    pointer.write_text(LFS_POINTER)
    with pytest.raises(UserError, match="indices_layer35.pt is a Git LFS pointer file .*`git lfs pull`"):
        _import(cfg, real_release, tmp_path / "r.sqlite")
    en = tmp_path / "en_db.json"
    en.write_text(LFS_POINTER)
    with pytest.raises(UserError, match="en_db.json is a Git LFS pointer file"):
        run_db_command(cfg, ["import", "--en-db", str(en), "--db", str(tmp_path / "e.sqlite")])
    ck = tmp_path / "ckpt_layer35.pt"
    ck.write_text(LFS_POINTER)
    with pytest.raises(UserError, match="ckpt_layer35.pt is a Git LFS pointer file"):
        run_db_command(cfg, ["import", "--ckpt", str(ck), "--db", str(tmp_path / "c.sqlite")])
