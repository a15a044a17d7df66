"""The `safesail` command line and the Hydra config: argument splitting, composition, overrides, multirun."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from safesail.cli import main, split_args
from safesail.stages import BY_NAME as STAGES
from safesail.config import compose


def test_split_args_separates_hydra_from_stage_words():
    hydra, stage = split_args(["search", "violence", "experiment=smoke", "+extra.key=1", "~wandb", "-m",
                               "--cfg", "job", "--json", "How do I?", "model.layers=[0,8]"])
    assert hydra == ["experiment=smoke", "+extra.key=1", "~wandb", "-m", "--cfg", "job", "model.layers=[0,8]"]
    assert stage == ["search", "violence", "--json", "How do I?"]
    # a sentence with an '=' in it is not an override
    assert split_args(["what is 2+2=4 ?"]) == ([], ["what is 2+2=4 ?"])


def test_default_config_is_the_embedded_model_on_bundled_data():
    cfg = compose([])
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.model.source == "smollm2"
    assert list(cfg.model.layers) == [0, 7, 14, 21, 29] and cfg.model.hook_site == "mlp_out"
    assert cfg.data.name == "bundled" and cfg.data.ctx_len == 256 and cfg.data.max_tokens is None
    assert cfg.cache.dtype == "bfloat16" and cfg.cache.batch_size == 8 and cfg.cache.eval_every == 20
    assert cfg.run.dir == "runs/demo"


def test_experiment_and_overrides_compose():
    cfg = compose(["experiment=smoke", "data.ctx_len=32", "cache.dtype=float16", "run.name=mine",
                   "model.layers=[1,2]"])
    assert cfg.model.name == "tiny" and cfg.data.max_tokens == 8192
    assert cfg.data.ctx_len == 32 and cfg.cache.dtype == "float16" and list(cfg.model.layers) == [1, 2]
    assert cfg.run.dir == "runs/mine"
    qwen = compose(["model=qwen2.5-3b-instruct"])
    assert list(qwen.model.layers) == [0, 8, 17, 26, 35] and qwen.model.dtype == "bfloat16"
    files = compose(["data=files", "data.paths=[/some/folder]"])
    assert list(files.data.paths) == ["/some/folder"] and files.data.ctx_len == 256
    with pytest.raises(Exception):
        compose(["cache.no_such_key=1"])


def test_unknown_stage_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "unknown stage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "cache" in capsys.readouterr().out
    assert "cache" in STAGES


def test_cache_stage_refuses_stray_words(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "please", "experiment=smoke", f"run.root={tmp_path}"])
    assert e.value.code == 2 and "takes no arguments" in capsys.readouterr().err


def test_multirun_runs_each_job_into_its_run_dir(tmp_path, cache_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["cache", "-m", "experiment=smoke", "run.name=a,b", f"run.root={tmp_path}", "device=cpu",
              "data.max_tokens=640", "cache.batch_size=5"])
    finally:
        torch.set_num_threads(threads)
    for name in ("a", "b"):
        meta = json.loads((tmp_path / name / "activations" / "layers.1.mlp_out" / "meta.json").read_text())
        assert meta["status"] == "complete" and meta["num_tokens"] == 640
        assert OmegaConf.load(tmp_path / name / "config.yaml").run.name == name


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_answers_help_without_running(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([name, "--help", f"run.root={tmp_path / 'runs'}"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(f"usage: safesail {name}") and STAGES[name].help in out and "example:" in out
    assert not (tmp_path / "runs").exists(), "--help ran the stage"


@pytest.mark.parametrize("override, words", [
    ("modle=tiny", ["'modle'", "did you mean model"]),
    ("sae.k=abc", ["sae.k must be an integer or null", "'abc'"]),
    ("model=tnyi", ["unknown model 'tnyi'", "tiny", "smollm2-135m-instruct"]),
    ("sae.kk=3", ["'sae.kk'", "did you mean sae.k", "expansion"]),
    ("cache.dtype=int8", ["cache.dtype must be one of bfloat16, float16, float32"]),
    ("train.restart=true", ["'train.restart'", "overwrite"]),
    ("explain.max_tokens=many", ["explain.max_tokens must be an integer"]),
])
def test_bad_override_is_one_line_and_writes_nothing(override, words, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("experiment_name: smoke\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "experiment=smoke", override, f"run.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert "+modle" not in err[0] and "Traceback" not in err[0]
    assert (run_dir / "config.yaml").read_text() == "experiment_name: smoke\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_multirun_sweep_values_are_each_checked(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "-m", "experiment=smoke", "sae.k=8,x", f"run.root={tmp_path}"])
    assert e.value.code == 2 and "sae.k must be an integer" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_every_experiment_and_group_option_passes_the_type_check():
    from safesail.config import check_overrides, config_groups
    from safesail.config_types import GROUPS

    check_overrides([])
    for group, options in config_groups().items():
        if group in GROUPS or group == "experiment":  # groups of one option are checked by the line above
            for option in options[1:] if len(options) > 1 else []:
                check_overrides([f"{group}={option}"])


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, cache_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", SAFESAIL_CACHE=str(cache_dir), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        # the whole bundled corpus (smoke caches 8k tokens, which the tiny model can finish before the signal lands)
        proc = subprocess.Popen([sys.executable, "-m", "safesail", "cache", "experiment=smoke", "device=cpu",
                                 "data.max_tokens=null", f"run.root={tmp_path / 'runs'}"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        # (a test run started in the background inherits SIGINT ignored; Python then never raises KeyboardInterrupt)
        # interrupt as soon as the stage is caching: its own progress bar has counted tokens, or a shard is on
        # disk (the whole corpus then takes the tiny model another ~2 s)
        import re

        def caching() -> bool:
            return bool(re.search(r"cache: [1-9]", log.read_text(errors="replace"))) or \
                any((tmp_path / "runs").glob("*/activations/*/*.safetensors"))

        deadline = time.monotonic() + 120
        while not caching() and time.monotonic() < deadline:
            time.sleep(0.02)
            if proc.poll() is not None:
                break
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    err = log.read_text(errors="replace")
    if proc.returncode == 0:
        pytest.skip(f"the cache finished before the interrupt arrived; its log ends: {err[-300:]!r}")
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; re-run the same command to resume"
    assert "Traceback" not in err


def test_the_library_never_imports_the_cli():
    import subprocess
    import sys

    code = ("import sys, importlib\n"
            "from safesail.stages import STAGES\n"
            "import safesail.pipeline, safesail.config\n"
            "for s in STAGES: importlib.import_module(s.target.split(':')[0])\n"
            "print('safesail.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
