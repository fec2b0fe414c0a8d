"""The appendix: errors, atomic files, array files without pickle, run records, the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scratchlm.errors import ScratchLMError, require_finite
from scratchlm.files import atomic_write_bytes, atomic_write_text, load_arrays, save_arrays
from scratchlm.runs import RECORD_KEYS, code_version, read_record, write_record


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "model.txt"
    atomic_write_text(target, "old")

    def disk_on_fire(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr("scratchlm.files.os.fsync", disk_on_fire)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.txt"]  # no temporary left behind


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    atomic_write_text(tmp_path / "record.json", "{}")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_arrays_round_trip_with_header(tmp_path):
    arrays = {"a": np.arange(5, dtype=np.float32), "b": np.eye(2)}
    save_arrays(tmp_path / "m.npz", "thing", arrays, {"vocab": ["x", "y"]})
    loaded, header = load_arrays(tmp_path / "m.npz", "thing")
    assert header["vocab"] == ["x", "y"] and header["kind"] == "thing"
    for name in arrays:
        np.testing.assert_array_equal(loaded[name], arrays[name])
        assert loaded[name].dtype == arrays[name].dtype


def test_corrupted_truncated_foreign_and_pickled_files_are_refused(tmp_path):
    save_arrays(tmp_path / "ok.npz", "thing", {"a": np.ones(1000)})
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"\x00" * 64)
    np.savez(tmp_path / "foreign.npz", a=np.ones(3))
    np.save(tmp_path / "pickled.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", __meta__=np.frombuffer(b'{"format": "scratchlm", "kind": "thing"}', np.uint8),
             a=np.array([{"x": 1}], dtype=object))
    for name, message in [("truncated.npz", "corrupted or truncated"), ("garbage.npz", "corrupted or truncated"),
                          ("foreign.npz", "not a scratchlm file"), ("pickled.npy", "thing"),
                          ("objects.npz", "corrupted or truncated"), ("absent.npz", "no such file")]:
        with pytest.raises(ScratchLMError, match=message):
            load_arrays(tmp_path / name, "thing")
    with pytest.raises(ScratchLMError, match="holds a 'thing', not a 'other'"):
        load_arrays(tmp_path / "ok.npz", "other")


def test_require_finite():
    assert require_finite(1.5, "loss") == 1.5
    with pytest.raises(ScratchLMError, match="loss at step 3 is nan"):
        require_finite(float("nan"), "loss at step 3")


def test_run_records_round_trip_and_are_validated(tmp_path):
    record = write_record(tmp_path / "r.json", command="python -m scratchlm x", config={"lr": 0.1},
                          metrics={"nll": 2.5}, curves={"loss": [[0, 3.0]]}, elapsed_seconds=1.23456)
    assert read_record(tmp_path / "r.json") == record
    assert set(RECORD_KEYS) <= set(record) and record["code_version"] == code_version()
    (tmp_path / "bad.json").write_text(json.dumps({"command": "x"}))
    with pytest.raises(ScratchLMError, match="missing config"):
        read_record(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ScratchLMError, match="not a valid run record"):
        read_record(tmp_path / "broken.json")


def test_cli_help_lists_every_chapter_command():
    done = subprocess.run([sys.executable, "-m", "scratchlm", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "bigram" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "scratchlm"], capture_output=True, text=True)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
