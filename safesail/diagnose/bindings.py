"""The database's SAEs, loaded once, with the latents the database knows and their normalisers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safesail.domains import SAFESAIL_K
from safesail.errors import UserError
from safesail.hooks import HookPoint

log = logging.getLogger(__name__)


@dataclass
class BoundSAE:
    hook: HookPoint
    sae: nn.Module
    latent_ids: torch.Tensor   # [m] int64: the database's latents of this SAE
    q999: torch.Tensor         # [m] float32: their 0.999 activation quantiles
    meta: dict

    @property
    def layer(self) -> int:
        return self.hook.layer

    @torch.no_grad()
    def normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, d_in] activations -> ([n, m] raw codes, [n, m] normalized codes) of the database's latents."""
        codes = self.sae.encode(x.to(self.q999.device, torch.float32))
        raw = codes.index_select(1, self.latent_ids)
        return raw, raw / self.q999


def _resolve(path: str, db_path: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (db_path.parent, db_path.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def load_one_sae(entry: dict, db_path: Path) -> nn.Module:
    """Load an SAE listed by `NeuronDB.saes()` in either layout."""
    if not entry.get("path"):
        L = HookPoint.parse(entry["hook"]).layer
        raise UserError(f"the neuron database names no SAE file for {entry['hook']}; import the release's "
                        f"ckpt_layer{L}.pt with `safesail db import --ckpt ...` or rebuild the database.")
    path = _resolve(str(entry["path"]), db_path)
    if not path.exists():
        raise UserError(f"the SAE file {path} listed in the neuron database for {entry['hook']} is missing; "
                        "restore it or rebuild the database.")
    layout = entry.get("layout", "safesail")
    if layout == "safesail-ckpt":
        from safesail.saes.safesail_layout import load_safesail_checkpoint

        return load_safesail_checkpoint(path, arch=entry.get("arch") or "topk", k=int(entry.get("k") or SAFESAIL_K),
                                        hook=entry["hook"])
    if layout == "safesail":
        from safesail.saes import load_sae

        return load_sae(path)
    raise UserError(f"the neuron database lists an SAE of unknown layout {layout!r}; use a database built "
                    "by this version of Safe-SAIL.")


def bind_saes(db, db_path: Path, device: torch.device, hidden_size: int, num_layers: int,
              loader=load_one_sae) -> list[BoundSAE]:
    """Every SAE of the database with its known latents, on `device`, sorted by layer."""
    entries = db.saes()
    for entry in entries:  # check every SAE against the model before loading any
        hp = HookPoint.parse(entry["hook"])
        if hp.layer >= num_layers:
            raise UserError(f"the neuron database has an SAE on layer {hp.layer} but the model has {num_layers} "
                            "layers; serve it with the model it was built for (model=...).")
        d_in = entry.get("d_in")
        if d_in is not None and int(d_in) != hidden_size:
            raise UserError(f"the neuron database's SAE for {hp} reads {d_in}-wide activations but the model's "
                            f"width is {hidden_size}; serve it with the model it was built for (model=...).")
    bound: list[BoundSAE] = []
    for entry in entries:
        hp = HookPoint.parse(entry["hook"])
        ids, q = db.normalizers(entry["hook"])
        ids = torch.as_tensor(ids, dtype=torch.int64)
        q = torch.as_tensor(q, dtype=torch.float32)
        good = torch.isfinite(q) & (q > 0)
        if not bool(good.all()):
            log.warning("%s: %d latents have no positive 0.999 quantile and are left out", hp, int((~good).sum()))
            ids, q = ids[good], q[good]
        sae = loader(entry, db_path).to(device).eval()
        sae.requires_grad_(False)
        bound.append(BoundSAE(hp, sae, ids.to(device), q.to(device), dict(entry)))
        log.info("%s: %s SAE, %d database latents", hp, entry.get("arch"), len(ids))
    if not bound:
        raise UserError("the neuron database lists no SAEs; build it with `safesail db build` or import "
                        "Safe-SAIL's files with `safesail db import`.")
    return sorted(bound, key=lambda b: b.hook)
