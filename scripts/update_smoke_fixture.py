"""Rewrite this machine's smoke fixture, tests/data/smoke_outputs.<machine>.json: the smoke run's
outputs in a normalised form.

`tests/test_smoke_outputs.py` runs `safesail run experiment=smoke` and compares what it
wrote with this machine's fixture, so that a refactor that should change no result proves it. A
change of output made on purpose (a new score kind, a new prompt) regenerates the
fixture in the same commit, on every machine kind that has one (`--all` lists them):

    python scripts/update_smoke_fixture.py            # run the smoke experiment, rewrite the fixture
    python scripts/update_smoke_fixture.py RUN_DIR    # normalise an existing smoke run instead

One fixture per machine kind (`machine_key`: CPU vendor, and AMX on Intel): the smoke run trains
SAEs and runs a local LLM in float32 and bf16 on the CPU, and oneDNN / MKL take other kernels on an
AMD EPYC and on an AMX Xeon, so the same code writes other last bits there, which training
amplifies into other latents (measured: session 6, the same commit on both kinds). Two runs on one
machine kind agree.

What is compared: every JSONL file of the run (interpret/*.jsonl, latents/<hook>/segments.jsonl),
selection.json, saes/sweep.json, and every table of neurons.sqlite (rows sorted; BLOBs as
sha256). What is dropped, because it differs between two runs of the same code:
  - wall-clock times and durations (`time`, `elapsed_s`, `seconds`, `peak_rss_*`);
  - whether an LLM answer came from the response cache (`cached`, `cached_calls`): a resumed
    run reads the cache, a fresh run does not;
  - `record_hash` columns of the DB and the `inputs` table's sha256 column: hashes of
    records and files that carry a time (explanations.jsonl, sae.safetensors metadata);
  - absolute paths: the repository root and the run directory become `<repo>` and `<run>`;
  - resume bookkeeping (`verify/done.jsonl`, cache `progress-*.jsonl`): fingerprints of inputs,
    not outputs.
The FTS index tables (explanations_fts*) are dropped: they are derived from `explanations`.
Floats are written with 6 significant digits. The smoke experiment's LLM runs with
`llm.deterministic: true` and one thread, so what arrived together does not move a score's last
bits (batched, a near-tied constant-control AUROC flipped on a loaded CI machine); the test still
compares numbers with a relative tolerance of 1e-4 (`close`), everything else exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "tests" / "data"


def machine_key() -> str:
    """The kind of CPU kernels this machine's torch takes: `amd`, `intel-amx`, `intel` (else the vendor), with
    `-avx2` added on a CPU without AVX-512 (no oneDNN bf16 kernels: the configs pick float32 there,
    safesail/cpu_kernels.py), e.g. `amd-avx2`."""
    vendor, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        import platform
        vendor = platform.processor() or platform.machine()
    avx2_only = bool(flags) and "avx512bw" not in flags
    if vendor == "AuthenticAMD":
        return "amd-avx2" if avx2_only else "amd"
    if vendor == "GenuineIntel":
        return "intel-amx" if "amx_bf16" in flags else ("intel-avx2" if avx2_only else "intel")
    return "".join(c if c.isalnum() else "-" for c in vendor.lower()) or "unknown"


def fixture_path(key: str | None = None) -> Path:
    return FIXTURE_DIR / f"smoke_outputs.{key or machine_key()}.json"


FIXTURE = fixture_path()
DROP_KEYS = {"time", "elapsed_s", "seconds", "cached", "cached_calls", "record_hash"}
DROP_PREFIXES = ("peak_rss",)
DROP_COLUMNS = {("inputs", "sha256")}
REL_TOL, ABS_TOL = 1e-4, 1e-6  # how close two numbers must be to count as equal
JSON_FILES = ("selection.json", "saes/sweep.json")
SKIP_FILES = {"verify/done.jsonl"}


def _clean(value, roots: dict[str, str]):
    if isinstance(value, dict):
        return {k: _clean(v, roots) for k, v in sorted(value.items())
                if k not in DROP_KEYS and not k.startswith(DROP_PREFIXES)}
    if isinstance(value, list):
        return [_clean(v, roots) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, str):
        for prefix, name in roots.items():
            value = value.replace(prefix, name)
        return value
    return value


def close(want, got) -> bool:
    """Equal, numbers within REL_TOL (relative) or ABS_TOL (absolute)."""
    if isinstance(want, bool) or isinstance(got, bool):
        return want == got
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(want, got, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(want, dict) and isinstance(got, dict):
        return want.keys() == got.keys() and all(close(want[k], got[k]) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(close(a, b) for a, b in zip(want, got))
    return want == got


def _jsonl(path: Path, roots: dict[str, str]) -> list:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [_clean(r, roots) for r in rows]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False))


def _db(path: Path, roots: dict[str, str]) -> dict:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
                  if not r[0].startswith("explanations_fts") and not r[0].startswith("sqlite_")]
        out = {}
        for table in tables:
            cur = con.execute(f'SELECT * FROM "{table}"')
            cols = [c[0] for c in cur.description]
            rows = []
            for row in cur:
                rec = {}
                for col, val in zip(cols, row):
                    if col in DROP_KEYS or (table, col) in DROP_COLUMNS:
                        continue
                    if isinstance(val, bytes):
                        val = "sha256:" + hashlib.sha256(val).hexdigest()
                    elif isinstance(val, str) and val[:1] in "{[":
                        try:
                            val = json.loads(val)
                        except ValueError:
                            pass
                    rec[col] = _clean(val, roots)
                rows.append(rec)
            out[table] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False))
        return out
    finally:
        con.close()


def normalise(run_dir: Path) -> dict:
    """The smoke run's comparable content: {relative file name: normalised content}."""
    run_dir = Path(run_dir).resolve()
    roots = {str(run_dir): "<run>", str(REPO): "<repo>"}
    out: dict = {}
    for path in sorted(run_dir.rglob("*.jsonl")):
        rel = path.relative_to(run_dir).as_posix()
        if rel.startswith(("activations/", "wandb/")) or "/progress" in rel or rel in SKIP_FILES:
            continue
        out[rel] = _jsonl(path, roots)
    for name in JSON_FILES:
        if (run_dir / name).is_file():
            out[name] = _clean(json.loads((run_dir / name).read_text(encoding="utf-8")), roots)
    out["neurons.sqlite"] = _db(run_dir / "neurons.sqlite", roots)
    return out


def run_smoke(root: Path) -> Path:
    """Run `safesail run experiment=smoke` with this tree's code into root; return the run directory."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    root.mkdir(parents=True, exist_ok=True)  # run from outside the repository: paths print the same everywhere
    proc = subprocess.run([sys.executable, "-m", "safesail", "run", "experiment=smoke", f"run.root={root}",
                           "device=cpu"], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the smoke run failed:\n{proc.stderr[-3000:]}")
    return root / "smoke"


def dump(content: dict) -> str:
    """One record a line, so that a change shows as a readable diff."""
    def rows(value) -> str:
        if isinstance(value, list):
            return "[\n" + ",\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in value) + "\n]"
        return json.dumps(value, sort_keys=True, ensure_ascii=False)

    parts = []
    for name, value in sorted(content.items()):
        if name == "neurons.sqlite":
            body = "{\n" + ",\n".join(f"{json.dumps(t)}: {rows(v)}" for t, v in sorted(value.items())) + "\n}"
        else:
            body = rows(value)
        parts.append(f"{json.dumps(name)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv: list[str]) -> int:
    if argv == ["--all"]:
        print("\n".join(sorted(p.name for p in FIXTURE_DIR.glob("smoke_outputs.*.json"))))
        return 0
    if argv:
        content = normalise(Path(argv[0]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            content = normalise(run_smoke(Path(tmp) / "runs"))
    FIXTURE.write_text(dump(content), encoding="utf-8")
    print(f"wrote {FIXTURE.relative_to(REPO)} ({FIXTURE.stat().st_size // 1024} KiB)")
    others = sorted(p.name for p in FIXTURE_DIR.glob("smoke_outputs.*.json") if p != FIXTURE)
    if others:
        print(f"fixtures of other machine kinds, to regenerate there if the change is deliberate: {', '.join(others)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
