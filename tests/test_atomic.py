"""One atomic-write helper (safesail/atomic.py): the old file or the new one, never half of one."""

import json
import os

import pytest
import torch

from safesail.atomic import (FILE_MODE, atomic_path, atomic_save_safetensors, atomic_torch_save, atomic_write_json,
                             atomic_write_text)


def test_writes_replace_the_target_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert (target.stat().st_mode & 0o777) == FILE_MODE
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_torch_save({"t": torch.arange(3)}, tmp_path / "c.pt")
    atomic_save_safetensors(tmp_path / "d.safetensors", {"w": torch.ones(2)}, {"format": "x"})
    assert torch.load(tmp_path / "c.pt")["t"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_suffix_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.name.endswith(".png") and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
