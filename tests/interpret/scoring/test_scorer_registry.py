"""Scorers register themselves (one file each); the score group is loaded typed, defaults only in its YAML."""

import pytest
from omegaconf import OmegaConf

from safesail.config import CONFIG_DIR, compose
from safesail.errors import UserError
from safesail.interpret.scoring.records import ScoreRecord
from safesail.interpret.scoring.registry import SCORERS, check_names, make_scorers, scorer_kinds
from safesail.interpret.scoring.stage import score_settings

from sim_fakes import FakeClient


def test_each_scorer_module_registers_its_kind():
    assert scorer_kinds() == ("detection", "fuzzing", "simulation")
    for kind in scorer_kinds():
        assert SCORERS[kind].__module__ == f"safesail.interpret.scoring.{kind}"
    with pytest.raises(ValueError, match="unknown score kind 'correlation'"):
        ScoreRecord(hook="h", layer=0, latent=1, kind="correlation")
    with pytest.raises(UserError, match="choose from detection, fuzzing, simulation"):
        check_names(["simulaton"])


def test_score_settings_are_the_yaml_defaults():
    cfg = compose([])
    sc = score_settings(cfg)
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "score" / "default.yaml"))
    composed = OmegaConf.to_container(cfg.score, resolve=True)  # the YAML, with the experiment's overrides
    assert {k: v for k, v in sc.items() if k != "concurrency"} == {k: v for k, v in composed.items()
                                                                   if k != "concurrency"}
    assert sc["bootstrap"] == yaml["bootstrap"] and sc["fuzzing"] == yaml["fuzzing"]
    assert yaml["concurrency"] is None and sc["concurrency"] == cfg.llm.concurrency  # null: llm.concurrency
    scorers = make_scorers(yaml["scorers"], client=FakeClient(), sc=sc)
    assert list(scorers) == ["simulation", "detection", "fuzzing"]
    assert scorers["fuzzing"].max_marks == yaml["fuzzing"]["max_marks"]


def test_a_wrong_or_missing_score_key_is_one_sentence():
    cfg = compose([])
    cfg.score.bootstrap = "lots"
    with pytest.raises(UserError, match=r"^score\.bootstrap must be an integer, not 'lots'"):
        score_settings(cfg)
    cfg = compose([])
    del cfg.score["fuzzing"]["max_marks"]
    with pytest.raises(UserError, match=r"lacks score\.fuzzing\.max_marks"):
        score_settings(cfg)
    cfg = compose(["score.granularity=word"])
    with pytest.raises(UserError, match="score.granularity"):
        score_settings(cfg)
