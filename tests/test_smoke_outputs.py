"""The smoke run's outputs equal a fixture written before the restructuring (issue 12).

`safesail run experiment=smoke` runs with this tree's code; its JSONL files, selection.json,
the sweep summary and every neuron-DB table, normalised by scripts/update_smoke_fixture.py
(times, cache hits, hashes of timed records, resume bookkeeping and absolute paths dropped; the
script's docstring lists them), must equal this machine kind's fixture,
tests/data/smoke_outputs.<machine>.json (`machine_key`: amd, intel-amx, ...; the CPU's kernels
change the last bits, and training amplifies them), numbers within a
relative 1e-4 (the local LLM's batching moves the last bits of a score between runs). The
fixture was first written from commit 8a1afd4, before the code moved; the cache, train,
select and collect outputs were checked equal to it after the structural commits (5abf0fa).

A change of output made on purpose (a new score kind, a new prompt, a new column) regenerates
the fixture in the same commit: `python scripts/update_smoke_fixture.py`; the diff of the fixture
then shows the change for review.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("update_smoke_fixture", REPO / "scripts" / "update_smoke_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _first_difference(want, got, close, where: str = "") -> str:
    if type(want) is not type(got) and not (isinstance(want, (int, float)) and isinstance(got, (int, float))):
        return f"{where}: {json.dumps(want, ensure_ascii=False)[:300]} != {json.dumps(got, ensure_ascii=False)[:300]}"
    if isinstance(want, dict):
        for key in sorted(set(want) | set(got)):
            if key not in got:
                return f"{where}/{key}: missing now"
            if key not in want:
                return f"{where}/{key}: new (not in the fixture)"
            if not close(want[key], got[key]):
                return _first_difference(want[key], got[key], close, f"{where}/{key}")
    if isinstance(want, list):
        if len(want) != len(got):
            return f"{where}: {len(want)} records in the fixture, {len(got)} now"
        for i, (a, b) in enumerate(zip(want, got)):
            if not close(a, b):
                return _first_difference(a, b, close, f"{where}[{i}]")
    return f"{where}: {json.dumps(want, ensure_ascii=False)[:300]} != {json.dumps(got, ensure_ascii=False)[:300]}"


@pytest.mark.slow
def test_smoke_outputs_equal_the_fixture(tmp_path, cache_dir):
    script = _script()
    if not script.FIXTURE.is_file():
        kinds = ", ".join(sorted(p.name for p in script.FIXTURE_DIR.glob("smoke_outputs.*.json")))
        pytest.fail(f"no smoke fixture for this machine kind ({script.machine_key()}; committed: {kinds}): run "
                    "scripts/update_smoke_fixture.py on a commit whose outputs are checked on another kind, and "
                    f"commit {script.FIXTURE.relative_to(REPO)}.")
    want = json.loads(script.FIXTURE.read_text(encoding="utf-8"))
    got = json.loads(script.dump(script.normalise(script.run_smoke(tmp_path / "runs"))))
    assert sorted(got) == sorted(want), "the smoke run wrote other files than the fixture lists"
    differing = [name for name in want if not script.close(want[name], got[name])]
    assert not differing, (f"smoke outputs differ from {script.FIXTURE.relative_to(REPO)} in {differing}; first: "
                           f"{_first_difference(want[differing[0]], got[differing[0]], script.close, differing[0])}. "
                           "If the change "
                           "is deliberate, run scripts/update_smoke_fixture.py and commit the fixture with it.")
