"""`safesail verify` on the smoke run: records, resume after SIGKILL with the same records, bad settings."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safesail.verify.records import CHECKS, TARGETS, effects_path, read_effects

UP_TO_TAG = ["cache", "train", "select", "collect", "explain", "score", "tag"]


def _env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SAFESAIL_CACHE=str(cache_dir), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _cmd(root: Path, stage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "safesail", stage, *extra, "experiment=smoke", f"run.root={root}", "device=cpu"]


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory, cache_dir) -> Path:
    """A smoke run directory through `tag` (no verify yet)."""
    root = tmp_path_factory.mktemp("verify") / "runs"
    proc = subprocess.run(_cmd(root, "run", *UP_TO_TAG), env=_env(cache_dir), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy(src_root: Path, dst: Path) -> Path:
    shutil.copytree(src_root, dst / "runs")
    return dst / "runs"


def _records(root: Path) -> list[dict]:
    recs = [e.to_json() for e in read_effects(effects_path(root / "smoke"))]
    return sorted(recs, key=lambda r: repr((r["hook"], r["latent"], r["target"], r["check"], r["metric"],
                                            r["domain"], r["lang"])))


@pytest.mark.slow
def test_verify_writes_records_and_resumes_after_sigkill(tagged_run, tmp_path, cache_dir):
    env = _env(cache_dir)
    clean = _copy(tagged_run, tmp_path / "clean")
    proc = subprocess.run(_cmd(clean, "verify"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _records(clean)
    assert want
    # every target the stage writes (the residual direction's records come from residual_direction.py, not the stage)
    assert {r["target"] for r in want} == set(TARGETS) - {"residual_direction", "random_direction"}
    assert {r["check"] for r in want} == set(CHECKS)
    assert any(r["ci_low"] is not None for r in want)
    for r in want:
        if r["ci_low"] is not None:
            assert r["ci_low"] <= r["value"] + 1e-9 <= r["ci_high"] + 2e-9
    assert (clean / "smoke" / "verify" / "baseline.json").is_file()

    killed = _copy(tagged_run, tmp_path / "killed")
    done = killed / "smoke" / "verify" / "done.jsonl"
    units = len((clean / "smoke" / "verify" / "done.jsonl").read_text().splitlines())
    stop_after = random.Random(0).randrange(1, units)
    p = subprocess.Popen(_cmd(killed, "verify"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        if done.is_file() and len(done.read_text().splitlines()) >= stop_after:
            break
        time.sleep(0.02)
    assert p.poll() is None, "verify finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert len(done.read_text().splitlines()) < units
    proc = subprocess.run(_cmd(killed, "verify"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(killed) == want
    # a finished stage does nothing the second time
    before = effects_path(killed / "smoke").read_bytes()
    proc = subprocess.run(_cmd(killed, "verify"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr
    assert effects_path(killed / "smoke").read_bytes() == before


@pytest.mark.parametrize("override, words", [
    ("verify.strength=1000", "verify.strength"),
    ("verify.latents=some", "verify.latents"),
    ("verify.latents=[7_850]", "quote the ids"),
    ("verify.latents=[\"7_850:sports\"]", "with a domain of"),
    ("+verify.bogus=1", "not a verify setting"),
    ("verify.strength_unit=meters", "verify.strength_unit"),
    ("verify.judge_modes=[vibes]", "verify.judge_modes"),
    ("verify.judge_batch_size=0", "verify.judge_batch_size"),
    ("verify.judge_quantize=int4", "verify.judge_quantize"),
    ("verify.residual_coef=0", "verify.residual_coef"),
])
def test_bad_verify_settings_are_one_sentence(smoke_cfg, override, words):
    from safesail.errors import UserError
    from safesail.verify.stage import VerifySettings

    with pytest.raises(UserError, match=words):
        VerifySettings.from_cfg(smoke_cfg(override))


@pytest.mark.slow
def test_raising_max_latents_extends_the_run_instead_of_restarting(tagged_run, tmp_path, cache_dir):
    env = _env(cache_dir)
    root = _copy(tagged_run, tmp_path / "extend")
    verify = root / "smoke" / "verify"
    proc = subprocess.run(_cmd(root, "verify", "verify.max_latents=2"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = {r["unit"] for r in map(json.loads, (verify / "done.jsonl").read_text().splitlines())}
    before = {json.dumps(r, sort_keys=True) for r in _records(root) if r["target"] != "diff_in_means"}
    proc = subprocess.run(_cmd(root, "verify", "verify.max_latents=3"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (verify / "done.jsonl").read_text().splitlines()]
    second = [r["unit"] for r in lines[len(first):]]
    latents_first = {u for u in first if u.startswith("latent:")}
    assert len(latents_first) == 2
    # the two latents done before are not redone; the third is added
    assert not latents_first & set(second) and sum(u.startswith("latent:") for u in second) == 1
    after = _records(root)
    assert {r["latent"] for r in after if r["target"] == "latent"} >= {int(u.rsplit(":", 1)[1]) for u in latents_first}
    kept = {json.dumps(r, sort_keys=True) for r in after if r["target"] != "diff_in_means"}
    assert before <= kept
    # every unit of the larger plan has its records, each once
    assert len({(r["hook"], r["latent"], r["target"], r["check"], r["metric"], r["domain"], r["lang"])
                for r in after}) == len(after)
    assert len({u for u in map(lambda r: r["unit"], lines)}) == len(set(first) | set(second))


@pytest.mark.slow
def test_named_latents_are_checked_in_their_order_against_their_domain(tagged_run, tmp_path, cache_dir):
    """`verify.latents: [<layer>_<index>[:domain], ...]`: those latents, in that order, whole; one collect did not
    cover is steered in residual units; a layer without an SAE is one sentence."""
    from safesail.interpret.records import read_latent_stats

    env = _env(cache_dir)
    root = _copy(tagged_run, tmp_path / "named")
    hook_dir = sorted((root / "smoke" / "latents").iterdir())[0]
    hook = hook_dir.name
    layer = int(hook.split(".")[1])
    collected = read_latent_stats(hook_dir, hook).latent_ids.tolist()
    uncollected = next(i for i in range(10_000) if i not in collected)
    ids = [f"{layer}_{uncollected}:terror", f"{layer}_{collected[0]}"]
    bad = subprocess.run(_cmd(root, "verify", f"verify.latents=[\"{layer + 90}_1\"]"), env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and f"has SAEs at layers {layer}" in bad.stderr
    quantile = subprocess.run(_cmd(root, "verify", f"verify.latents=[\"{ids[0]}\"]", "verify.strength_unit=quantile"),
                              env=env, capture_output=True, text=True, timeout=600)
    assert quantile.returncode != 0 and "collect did not cover" in quantile.stderr
    arg = "verify.latents=[" + ",".join(f'"{x}"' for x in ids) + "]"
    proc = subprocess.run(_cmd(root, "verify", arg, "verify.reference=false", "verify.strength_unit=residual",
                               "verify.strength=0.3", "verify.strength_scan=[]"),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    units = [json.loads(x)["unit"] for x in (root / "smoke" / "verify" / "done.jsonl").read_text().splitlines()]
    assert units == [f"latent:{hook}:{uncollected}", f"latent:{hook}:{collected[0]}"]
    recs = _records(root)
    suff = {r["latent"]: r for r in recs if r["target"] == "latent" and r["check"] == "sufficiency"}
    assert set(suff) == {uncollected, collected[0]}
    assert {r["domain"] for r in recs if r["latent"] == uncollected and r["target"] == "latent"} == {"terror"}


def test_new_settings_at_their_defaults_leave_unit_fingerprints_as_before(smoke_cfg):
    """A finished run's units stay valid after an upgrade that adds keys, while the keys are at their defaults."""
    from safesail.verify.stage import VerifySettings

    added = {"judge_quantize", "sufficiency_prompts", "open_prompts", "random_latents", "residual_direction",
             "residual_layer", "residual_layers", "residual_coef"}
    assert not added & set(VerifySettings.from_cfg(smoke_cfg()).unit_settings())
    changed = VerifySettings.from_cfg(smoke_cfg("verify.random_latents=3", "verify.residual_direction=true",
                                                "verify.sufficiency_prompts=open")).unit_settings()
    assert added - {"judge_quantize"} <= set(changed) and changed["random_latents"] == 3


@pytest.mark.slow
def test_residual_direction_units_are_written_once_and_resumed(tagged_run, tmp_path, cache_dir):
    env = _env(cache_dir)
    root = _copy(tagged_run, tmp_path / "resid")
    args = ("verify.residual_direction=true", "verify.max_latents=1", "verify.reference=false")
    bad = subprocess.run(_cmd(root, "verify", *args, "verify.residual_layer=99"), env=env, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "verify.residual_layer has block 99" in bad.stderr
    proc = subprocess.run(_cmd(root, "verify", *args), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(root)
    resid = [r for r in recs if r["target"] in ("residual_direction", "random_direction")]
    assert {r["target"] for r in resid} == {"residual_direction", "random_direction"}
    assert all(r["hook"].endswith(".resid") and r["check"] == "refusal" for r in resid)
    assert {r["metric"].rsplit("_", 1)[1] for r in resid} == {"ablate", "steer"}
    done = root / "smoke" / "verify" / "done.jsonl"
    units = [json.loads(x)["unit"] for x in done.read_text().splitlines()]
    assert any(u.startswith("resid:") for u in units)
    # a second run, in a copy of the run directory, finds every unit done (the residual units' records are kept,
    # not dropped as unplanned; a unit knows its SAE by its training fingerprint, not by its absolute path)
    moved = _copy(root, tmp_path / "moved")
    proc = subprocess.run(_cmd(moved, "verify", *args), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = moved / "smoke" / "verify" / "done.jsonl"
    assert _records(moved) == recs and len(done.read_text().splitlines()) == len(units)
