"""The `verify` group's settings (`config_types.VerifyConfig`) with their ranges checked, and what of them a
unit's fingerprint holds (`unit_settings`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf

from safesail.config_types import VerifyConfig, load_group
from safesail.domains import DOMAINS
from safesail.errors import UserError
from safesail.verify.checks import CheckSettings
from safesail.verify.interventions import POSITIONS
from safesail.verify.prompts import SOURCES as PROMPT_SOURCES
from safesail.verify.steering import UNITS

JUDGE_MODES = ("paired", "absolute")
_LATENT_ID = re.compile(r"^\d+_\d+$")


@dataclass
class VerifySettings(VerifyConfig):
    """The typed `verify` group (`config_types.VerifyConfig`) with its ranges checked."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> VerifySettings:
        node = cfg.get("verify") or OmegaConf.create({})
        unknown = sorted(set(node.keys()) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"verify.{unknown[0]} is not a verify setting; see configs/verify/default.yaml.")
        check_latent_list(node.get("latents"))
        if node.get("steer_positions") not in (None, *POSITIONS):
            raise UserError(f"verify.steer_positions is {node.get('steer_positions')!r}; use {' or '.join(POSITIONS)}.")
        if node.get("sufficiency_prompts") not in (None, *PROMPT_SOURCES):
            raise UserError(f"verify.sufficiency_prompts is {node.get('sufficiency_prompts')!r}; use twins (the "
                            "concept pairs' neutral twins) or open (open-ended prompts, verify.open_prompts).")
        if node.get("strength_unit") not in (None, *UNITS):
            raise UserError(f"verify.strength_unit is {node.get('strength_unit')!r}; use {' or '.join(UNITS)}.")
        modes = node.get("judge_modes")
        if modes is not None and (not isinstance(modes, (list, tuple)) and not OmegaConf.is_list(modes)
                                  or not set(modes) <= set(JUDGE_MODES)):
            raise UserError(f"verify.judge_modes is {modes!r}; give a list of {' and '.join(JUDGE_MODES)}.")
        s = load_group(node, cls, "verify")
        for name in ("max_latents", "queries_per_domain", "max_new_tokens", "batch_size", "wave", "n_boot"):
            if int(getattr(s, name)) < 1:
                raise UserError(f"verify.{name} is {getattr(s, name)}; set it to a positive integer.")
        if not 1 <= int(s.random_latents) <= 16:
            raise UserError(f"verify.random_latents is {s.random_latents}; set it to 1-16 random latents per latent.")
        if s.judge_batch_size is not None and int(s.judge_batch_size) < 1:
            raise UserError(f"verify.judge_batch_size is {s.judge_batch_size}; set it to a positive integer (or null: "
                            "the llm group's batch_size).")
        if s.sufficiency_queries is not None and int(s.sufficiency_queries) < 2:
            raise UserError(f"verify.sufficiency_queries is {s.sufficiency_queries}; set it to 2 or more (or null: "
                            "as many as verify.queries_per_domain).")
        if not 0 < float(s.residual_coef) <= 100:
            raise UserError(f"verify.residual_coef is {s.residual_coef}; use a value in (0, 100], e.g. 1 (the "
                            "direction's own norm).")
        for x in [s.strength, *s.strength_scan]:
            if not 0 < float(x) <= 100:
                raise UserError(f"verify.strength{'' if x == s.strength else '_scan'} has {x}; use strengths in "
                                "(0, 100], e.g. 8 (x the 0.999 quantile) or 1 (x the residual norm).")
        return s

    def checks(self) -> CheckSettings:
        return CheckSettings(self.max_new_tokens, self.batch_size, self.top_tokens, self.n_boot, self.seed,
                             tuple(self.judge_modes))

    def unit_settings(self) -> dict:
        """The settings a unit's records depend on (not which or how many latents are planned)."""
        d = dataclasses.asdict(self)
        for k in ("max_latents", "latents", "wave", "judge_batch_size"):
            d.pop(k)
        # keys at their defaults leave the fingerprints as they were before the keys existed, so a finished
        # run's units stay valid after an upgrade
        for key, default, also in (("judge_quantize", "none", ()),
                                   ("sufficiency_prompts", "twins", ("open_prompts",)),
                                   ("random_latents", 1, ()),
                                   ("residual_direction", False, ("residual_layer", "residual_layers", "residual_coef"))):
            if d.get(key) == default:
                for k in (key, *also):
                    d.pop(k)
        return d


def check_latent_list(value) -> None:
    """`verify.latents` is tagged, candidates, or a list of `<layer>_<index>` ids, each optionally
    `:<domain>` (the domain its steered answers are judged against when it has no explanation)."""
    if value in (None, "tagged", "candidates"):
        return
    if not (isinstance(value, (list, tuple)) or OmegaConf.is_list(value)) or not len(value):
        raise UserError(f"verify.latents is {value!r}; use tagged, candidates, or a list of latent ids such as "
                        "[7_850, 29_4252:pornography].")
    for item in value:
        if isinstance(item, int):
            raise UserError(f"verify.latents has the number {item}: Hydra reads an unquoted 7_850 as 7850; quote the "
                            "ids, e.g. 'verify.latents=[\"7_850\",\"29_4252:pornography\"]'.")
        ident, _, domain = str(item).partition(":")
        if not _LATENT_ID.match(ident) or (domain and domain not in DOMAINS):
            raise UserError(f"verify.latents has {item!r}; write <layer>_<index> or <layer>_<index>:<domain> with "
                            f"a domain of {', '.join(DOMAINS)} (e.g. 7_850:terror).")


def check_residual_layers(s: VerifySettings, n_blocks: int) -> None:
    """A residual-direction block outside the source model's `n_blocks` is one sentence."""
    for name, layers in (("residual_layer", [s.residual_layer]), ("residual_layers", s.residual_layers or [])):
        bad = [x for x in layers if x is not None and not 0 <= int(x) < n_blocks]
        if bad:
            raise UserError(f"verify.{name} has block {bad[0]}, but the source model has blocks 0-{n_blocks - 1}; "
                            "pick blocks in that range (or null: chosen on the reference pairs).")
