"""mxptq.io: atomic writes leave either the old file or the complete new one, and remove the
temporary files of killed writers."""

from __future__ import annotations

import json
import math
import os
import re
import stat

import pytest

from mxptq.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]  # no temp file left


def test_json_is_sorted_and_newline_terminated(tmp_path):
    target = atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [1.5, None]})
    assert target.read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    assert json.loads(target.read_text()) == {"a": [1.5, None], "b": 1}


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"ppl": math.nan})  # NaN is not JSON
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_safetensors_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from mxptq.io import atomic_save_safetensors

    tensors = {"codes": torch.arange(6, dtype=torch.uint8).reshape(2, 3)}
    path = atomic_save_safetensors(tmp_path / "m.safetensors", tensors, {"format": "mx"})
    assert torch.equal(load_file(path)["codes"], tensors["codes"])


def test_orphaned_temp_files_of_the_target_are_removed(tmp_path):
    # Issue 30: a writer killed mid-write left ".r.json.<8 chars>.tmp" behind, forever.
    fcntl = pytest.importorskip("fcntl")  # the lock that tells a live writer's file from an orphan
    orphan = tmp_path / ".r.json.k1ll3d_x.tmp"
    live = tmp_path / ".r.json.w0rking1.tmp"
    unrelated = [".r.json.tmp", "r.json.bak", ".r.json.bin.abcdefgh.tmp", ".q.json.abcdefgh.tmp",
                 ".r.json.abcdefghi.tmp", "notes.tmp"]
    for name in [orphan.name, live.name, *unrelated]:
        (tmp_path / name).write_text("left over")
    with open(live, "rb+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another process, still writing the same target
        atomic_write_json(tmp_path / "r.json", {"ok": True})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", live.name, *unrelated])


@pytest.mark.parametrize(("umask", "file_mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_a_plain_open_gives(tmp_path, umask, file_mode):
    # Issue 29: mkstemp's 0600 stayed on every report and checkpoint (unreadable on a shared cluster).
    torch = pytest.importorskip("torch")
    from mxptq.io import atomic_save_safetensors, make_temp_dir

    previous = os.umask(umask)
    try:
        written = [atomic_write_json(tmp_path / "report.json", {"ok": True}),
                   # safetensors writes its own 0600 temporary file and renames it over ours
                   atomic_save_safetensors(tmp_path / "model.safetensors", {"x": torch.zeros(2)})]
        directory = make_temp_dir(tmp_path, prefix=".checkpoint.tmp-")
    finally:
        os.umask(previous)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == dict.fromkeys(
        ["report.json", "model.safetensors"], file_mode)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask
    assert re.fullmatch(r"\.checkpoint\.tmp-[a-z0-9_]{8}", directory.name)
