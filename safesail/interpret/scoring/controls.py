"""The controls beside every score: a shuffled explanation and a constant one.

* shuffled: the same scorer on another latent's explanation. Partners are fixed: the
  explained latents are put in an order given by a hash of (hook, latent) and each takes
  the next one's explanation whose text differs from its own (a derangement that does
  not pair neighbouring indices, which select often picks from one domain).
* constant: the same scorer on one fixed, content-free explanation (`score.constant_explanation`),
  the same for every latent: what the scorer gives when the explanation says nothing.

An explanation means something only where its score beats the shuffled control
(`beats_shuffled`); the run summary reports how often it does.
"""

from __future__ import annotations

import hashlib

CONTROLS = ("shuffled", "constant")


def _norm(text) -> str:
    return " ".join(str(text or "").lower().split())


def shuffled_partners(expls: dict[tuple[str, int], dict]) -> dict[tuple[str, int], tuple[str, int] | None]:
    """For each latent with an explanation, the latent whose explanation is its shuffled control (or None)."""
    ok = [k for k, r in expls.items() if r.get("status") == "ok" and _norm(r.get("explanation"))]
    order = sorted(ok, key=lambda k: (hashlib.sha256(f"{k[0]}|{k[1]}".encode()).hexdigest(), k))
    out: dict[tuple[str, int], tuple[str, int] | None] = {}
    for i, key in enumerate(order):
        mine = _norm(expls[key].get("explanation"))
        out[key] = None
        for step in range(1, len(order)):
            other = order[(i + step) % len(order)]
            if _norm(expls[other].get("explanation")) != mine:
                out[key] = other
                break
    return out


def beats(value: float | None, control: float | None) -> bool | None:
    """Whether a score beats its control (None when either is undefined)."""
    if value is None or control is None:
        return None
    return value > control
