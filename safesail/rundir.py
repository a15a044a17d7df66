"""The run directory: where every stage reads and writes.

Its file names live in `safesail/layout.py` (the tree is drawn there and in
docs/contracts.md); `RunDir` turns them into paths, checks that the folder is writable,
saves the resolved config and keeps the per-stage completion records.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from safesail import layout as L
from safesail.atomic import atomic_write_json, atomic_write_text  # noqa: F401  (also imported from here)
from safesail.errors import UserError


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (or an OmegaConf node)."""
    if isinstance(obj, DictConfig) or OmegaConf.is_config(obj):
        obj = OmegaConf.to_container(obj, resolve=True)
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hook_dirname(hook: str) -> str:
    """Folder name for a hook point name (already filesystem safe: `layers.8.mlp_out`)."""
    return hook.replace("/", "_")


@dataclass
class RunDir:
    root: Path

    @classmethod
    def from_cfg(cls, cfg: DictConfig, create: bool = True) -> "RunDir":
        root = Path(cfg.run.dir)
        if not root.is_absolute():
            root = Path(cfg.run.get("base_dir") or os.getcwd()) / root
        rd = cls(root)
        if create:
            rd.ensure_writable()
        return rd

    # ---- folders and files (names: safesail/layout.py) -------------------
    def activations(self, hook: str) -> Path:
        return self.root / L.ACTIVATIONS_DIR / hook_dirname(hook)

    def saes(self, hook: str | None = None) -> Path:
        return self.root / L.SAES_DIR if hook is None else self.root / L.SAES_DIR / hook_dirname(hook)

    def latents(self, hook: str) -> Path:
        return self.root / L.LATENTS_DIR / hook_dirname(hook)

    def latent_stats(self, hook: str) -> Path:
        return self.latents(hook) / L.LATENT_STATS

    def latent_segments(self, hook: str) -> Path:
        return self.latents(hook) / L.LATENT_SEGMENTS

    def latent_meta(self, hook: str) -> Path:
        return self.latents(hook) / L.LATENT_META

    @property
    def config_file(self) -> Path:
        return self.root / L.CONFIG

    @property
    def pipeline_file(self) -> Path:
        return self.root / L.PIPELINE_SUMMARY

    @property
    def interpret(self) -> Path:
        return self.root / L.INTERPRET_DIR

    @property
    def explanations_file(self) -> Path:
        return self.interpret / L.EXPLANATIONS

    @property
    def scores_file(self) -> Path:
        return self.interpret / L.SCORES

    @property
    def tags_file(self) -> Path:
        return self.interpret / L.TAGS

    @property
    def llm_cache_file(self) -> Path:
        return self.interpret / L.LLM_CACHE

    @property
    def verify(self) -> Path:
        return self.root / L.VERIFY_DIR

    @property
    def effects_file(self) -> Path:
        return self.verify / L.EFFECTS

    @property
    def selection_file(self) -> Path:
        return self.root / L.SELECTION

    @property
    def neuron_db(self) -> Path:
        return self.root / L.NEURON_DB

    @property
    def export(self) -> Path:
        return self.root / L.EXPORT_DIR

    @property
    def stages(self) -> Path:
        return self.root / L.STAGES_DIR

    def stage_file(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    # ---- checks ----------------------------------------------------------
    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except PermissionError:
            raise UserError(f"the run directory {self.root} is not writable; choose another with "
                            "run.root=... or fix its permissions.") from None
        except OSError as e:
            raise UserError(f"cannot write to the run directory {self.root} ({e.strerror}); free disk "
                            "space or choose another with run.root=....") from None

    def save_config(self, cfg: DictConfig) -> None:
        """Save the resolved config; refuse a run directory made by another experiment."""
        path = self.config_file
        if path.exists():
            old = OmegaConf.load(path)
            old_exp = OmegaConf.select(old, "experiment_name")
            if old_exp is not None and old_exp != cfg.get("experiment_name") and not cfg.run.get("force", False):
                raise UserError(f"{self.root} holds a run of experiment {old_exp!r}, not "
                                f"{cfg.get('experiment_name')!r}; pick another run.name=... or pass "
                                "run.force=true to reuse it.")
        atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))

    # ---- stage records ----------------------------------------------------
    def stage_record(self, stage: str) -> dict | None:
        path = self.stage_file(stage)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def stage_done(self, stage: str, fp: str) -> bool:
        rec = self.stage_record(stage)
        return bool(rec and rec.get("status") == "done" and rec.get("fingerprint") == fp)

    def mark_stage(self, stage: str, fp: str, status: str = "done", **summary: Any) -> None:
        atomic_write_json(self.stage_file(stage),
                          {"stage": stage, "status": status, "fingerprint": fp,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary})
