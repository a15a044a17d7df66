"""The causal checks of `safesail verify` in the neuron DB: `verify/effects.jsonl` -> table `verify_effects`.

Records are read through the verify stage's own reader (`safesail.verify.records`); a
record about an SAE latent the DB holds is linked to its row (`latent_id`), others
(the difference-in-means reference, a random latent outside the DB) keep only their
hook, layer and latent index. The table is replaced as a whole whenever the file changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from safesail.verify.records import read_effects

NAME = "verify_effects"       # its name in the `inputs` table of file hashes
COLUMNS = ("hook", "layer", "latent", "target", "domain", "lang", "check", "metric", "value", "ci_low", "ci_high",
           "n", "details")


def load_effects(c, path: Path) -> int:
    """Replace every row of `verify_effects` with the records of `path`; returns the number of rows."""
    c.execute("DELETE FROM verify_effects")
    ids = {(h, i): lid for lid, h, i in c.execute("SELECT id, hook, idx FROM latents")}
    rows = []
    for e in read_effects(path):
        lid = ids.get((e.hook, e.latent)) if e.latent is not None else None
        rows.append((lid, e.hook, e.layer, e.latent, e.target, e.domain, e.lang, e.check, e.metric, e.value,
                     e.ci_low, e.ci_high, e.n, json.dumps(e.details, ensure_ascii=False)))
    cols = ", ".join(f'"{k}"' for k in ("latent_id", *COLUMNS))
    c.executemany(f"INSERT INTO verify_effects({cols}) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})", rows)
    return len(rows)


def effects_of(conn, lid: int) -> list[dict]:
    """The verify results stored for one latent row, in a stable order."""
    cols = ", ".join(f'"{k}"' for k in COLUMNS)
    out = []
    for r in conn.execute(f"SELECT {cols} FROM verify_effects WHERE latent_id = ? "
                          'ORDER BY "check", metric, target, domain, lang', (lid,)).fetchall():
        d = dict(zip(COLUMNS, r))
        d["details"] = json.loads(d["details"]) if d["details"] else {}
        out.append(d)
    return out


def all_effects(conn):
    """Every stored result as a dict (for export/verify.jsonl), in a stable order."""
    cols = ", ".join(f'"{k}"' for k in COLUMNS)
    for r in conn.execute(f"SELECT {cols} FROM verify_effects "
                          'ORDER BY layer, hook, latent IS NULL, latent, "check", metric, target, domain, lang, id'):
        d = dict(zip(COLUMNS, r))
        d["details"] = json.loads(d["details"]) if d["details"] else {}
        yield d
