"""The appendix: errors, atomic files, array files without pickle, run records, the command line."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from scratchlm.errors import ScratchLMError, require_finite
from scratchlm.files import atomic_write_bytes, atomic_write_text, check_arrays, layout, load_arrays, save_arrays
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


def test_a_compressed_file_holds_the_same_arrays_in_fewer_bytes_and_is_still_checked(tmp_path):
    import zipfile

    arrays = {"zeros": np.zeros((100, 100), dtype=np.float32), "b": np.arange(7, dtype=np.int64)}
    save_arrays(tmp_path / "plain.npz", "thing", arrays, {"vocab": ["x"]})
    save_arrays(tmp_path / "packed.npz", "thing", arrays, {"vocab": ["x"]}, compress=True)
    with zipfile.ZipFile(tmp_path / "packed.npz") as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    with zipfile.ZipFile(tmp_path / "plain.npz") as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    assert (tmp_path / "packed.npz").stat().st_size < (tmp_path / "plain.npz").stat().st_size / 10
    loaded, header = load_arrays(tmp_path / "packed.npz", "thing")
    assert header == load_arrays(tmp_path / "plain.npz", "thing")[1]
    for name in arrays:
        assert loaded[name].dtype == arrays[name].dtype and np.array_equal(loaded[name], arrays[name])
    raw = (tmp_path / "packed.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ScratchLMError, match="corrupted or truncated"):
        load_arrays(tmp_path / "truncated.npz", "thing")


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
    # a text file, an empty file, a bare pickle: refused as not an archive, with no
    # advice to allow pickles (what np.load itself would say)
    (tmp_path / "notes.npz").write_text("some text, not an archive\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    for name in ("notes.npz", "empty.npz", "pickled.npy", "garbage.npz"):
        with pytest.raises(ScratchLMError, match="not an .npz archive") as caught:
            load_arrays(tmp_path / name, "thing")
        assert "pickle" not in str(caught.value).replace(str(tmp_path / name), "")


def test_check_arrays_names_the_source_and_the_first_tensor_that_does_not_fit():
    good = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    check_arrays("f.npz", good, layout(good))
    for arrays, message in [({**good, "w": good["w"][:, :1]}, "f.npz: tensor 'w' should be float32[2, 3], got float32[2, 1]"),
                            ({**good, "b": good["b"].astype(np.float64)}, "f.npz: tensor 'b' should be float32[3], got float64[3]"),
                            ({"b": good["b"]}, "f.npz: tensor 'w' should be float32[2, 3], got missing"),
                            ({**good, "x": good["b"]}, "f.npz: unexpected tensor 'x'")]:
        with pytest.raises(ScratchLMError) as caught:
            check_arrays("f.npz", arrays, layout(good))
        assert str(caught.value) == message


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


# Mutation testing (tests/MUTATION.md): behaviour that planted bugs showed no test stated.


def test_require_finite_refuses_both_infinities():
    for bad in (float("inf"), float("-inf")):
        with pytest.raises(ScratchLMError, match=f"loss is {bad}"):
            require_finite(bad, "loss")


def test_atomic_write_makes_missing_folders_and_replaces_an_existing_file(tmp_path):
    target = tmp_path / "new" / "folder" / "record.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "nëw")
    assert target.read_bytes() == "nëw".encode("utf-8")
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_the_partial_file_is_hidden_beside_its_target(tmp_path, monkeypatch):
    """The rename is atomic only within one folder (one file system), and a reader
    globbing for *.json must not pick up a half-written file."""
    target, seen, real_fsync = tmp_path / "record.json", [], os.fsync

    def look_then_fsync(fd):
        seen.extend(p.name for p in tmp_path.iterdir())
        real_fsync(fd)

    monkeypatch.setattr("scratchlm.files.os.fsync", look_then_fsync)
    atomic_write_text(target, "{}")
    assert len(seen) == 1 and seen[0].startswith(".") and not seen[0].endswith(".json")
    assert target.read_text() == "{}"


def test_array_file_header_and_its_reserved_name(tmp_path):
    save_arrays(tmp_path / "m.npz", "thing", {"a": np.ones(2)}, {"vocab": ["x"]})
    _, header = load_arrays(tmp_path / "m.npz", "thing")
    assert header == {"format": "scratchlm", "kind": "thing", "version": 1, "vocab": ["x"]}
    with pytest.raises(ScratchLMError, match="'__meta__' is reserved"):
        save_arrays(tmp_path / "bad.npz", "thing", {"__meta__": np.ones(2)})
    assert not (tmp_path / "bad.npz").exists()


def test_a_header_of_another_format_is_refused_naming_the_file(tmp_path):
    import re

    for name, meta in [("other.npz", b'{"format": "other", "kind": "thing"}'), ("list.npz", b"[1, 2]")]:
        np.savez(tmp_path / name, __meta__=np.frombuffer(meta, np.uint8), a=np.ones(2))
        with pytest.raises(ScratchLMError, match=re.escape(f"{tmp_path / name} is not a scratchlm file")):
            load_arrays(tmp_path / name, "thing")


def test_code_version_changes_exactly_when_a_source_file_changes(tmp_path, monkeypatch):
    import re

    import scratchlm.runs as runs

    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "b.py").write_text("B = 2\n")
    monkeypatch.setattr(runs, "__file__", str(tmp_path / "runs.py"))
    first = runs.code_version()
    assert re.fullmatch("[0-9a-f]{12}", first)
    (tmp_path / "notes.txt").write_text("not code")
    assert runs.code_version() == first
    # the tangler's lines say where the code is in the book; prose edits move them
    (tmp_path / "b.py").write_text(
        "# Tangled from the book by book/_ext/tangle.py; do not edit this file.\n"
        "# Edit book/01_x.md and run `python book/_ext/tangle.py`.\n"
        "# body sha256: 0123\n# book/01_x.md:42\nB = 2\n"
    )
    assert runs.code_version() == first
    (tmp_path / "b.py").write_text("# a comment of the code\nB = 2\n")
    assert runs.code_version() != first
    (tmp_path / "b.py").write_text("B = 3\n")
    assert runs.code_version() != first


def test_command_line_is_what_the_user_typed(monkeypatch):
    from scratchlm.runs import command_line

    monkeypatch.setattr(sys, "argv", ["/somewhere/scratchlm/__main__.py", "train", "--config", "x.toml"])
    assert command_line() == "python -m scratchlm train --config x.toml"


def test_run_record_fields_defaults_and_layout(tmp_path):
    import platform
    import re

    record = write_record(tmp_path / "r.json", command="c", config={}, metrics={}, elapsed_seconds=1.23456)
    assert record["curves"] == {} and record["samples"] == [] and record["elapsed_seconds"] == 1.235
    environment = record["environment"]
    assert set(environment) == {"python", "numpy", "machine", "date"}
    assert environment["python"] == platform.python_version() and environment["numpy"] == np.__version__
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", environment["date"])
    text = (tmp_path / "r.json").read_text()
    assert text.endswith("}\n") and len(text.splitlines()) > len(RECORD_KEYS)  # readable: a key per line


def test_a_missing_or_incomplete_record_is_named(tmp_path):
    import re

    with pytest.raises(ScratchLMError, match=re.escape(f"no run record at {tmp_path / 'absent.json'}")):
        read_record(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text(json.dumps({"command": "x", "config": {}}))
    with pytest.raises(ScratchLMError, match="missing metrics, curves, samples"):
        read_record(tmp_path / "bad.json")


def test_every_command_says_what_it_is_for_in_the_listing():
    import argparse

    from scratchlm.cli import build_parser

    def check(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), name
                for sub_name, command in action.choices.items():
                    check(command, f"{name} {sub_name}")

    check(build_parser(), "python -m scratchlm")


def test_main_turns_user_errors_into_exit_2_and_lets_bugs_through(monkeypatch, capsys):
    """The CLI's contract: a command's status passes through; ScratchLMError and OSError
    (a missing or unreadable file) are one line and exit 2; Ctrl-C is 130; a bug keeps
    its traceback."""
    from scratchlm import cli

    def parser_running(outcome):
        parser = cli.OneLineParser(prog="p")
        parser.set_defaults(run=outcome)
        monkeypatch.setattr(cli, "build_parser", lambda: parser)

    def raise_(error):
        def run(args):
            raise error
        return run

    parser_running(lambda args: 3)
    assert cli.main([]) == 3
    for error in (ScratchLMError("bad value 7"), FileNotFoundError("no such file: x")):
        parser_running(raise_(error))
        assert cli.main([]) == 2 and capsys.readouterr().err == f"error: {error}\n"
    parser_running(raise_(KeyboardInterrupt()))
    assert cli.main([]) == 130 and capsys.readouterr().err == "interrupted\n"
    parser_running(raise_(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        cli.main([])


def test_a_missing_command_is_one_line_naming_the_program(capsys):
    from scratchlm.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("python -m scratchlm: error: ")
    assert err.endswith("(see --help)\n") and len(err.splitlines()) == 1


def test_the_cache_is_xdg_cache_home_or_dot_cache(tmp_path, monkeypatch):
    from scratchlm import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "scratchlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "scratchlm"


def test_data_path_downloads_a_manifest_file_into_the_cache_once(tmp_path, monkeypatch):
    from scratchlm import data

    body = "caf\u00e9\n".encode("utf-8")
    relative = "tinyshakespeare/input.txt"
    monkeypatch.setitem(data.MANIFEST, relative, (hashlib.sha256(body).hexdigest(), "o/r:p.txt@abc"))
    monkeypatch.setenv("SCRATCHLM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SCRATCHLM_OFFLINE")
    fetches = []
    latin1 = lambda url: fetches.append(url) or "caf\u00e9\r\n".encode("latin-1")  # noqa: E731
    path = data.data_path(relative, fetch=latin1)
    assert path == tmp_path / "cache" / "scratchlm" / relative and path.read_bytes() == body
    assert data.data_path(relative, fetch=latin1) == path and len(fetches) == 1
    looked = f"{tmp_path / 'data' / 'x.txt'}, {tmp_path / 'cache' / 'scratchlm' / 'x.txt'}"
    with pytest.raises(ScratchLMError, match=re.escape(f"data file x.txt not found (looked in {looked})")):
        data.data_path("x.txt", fetch=latin1)
    monkeypatch.setitem(data.MANIFEST, "wheel.txt", ("0" * 64, None))
    with pytest.raises(ScratchLMError, match="wheel.txt has no download source .*: set SCRATCHLM_DATA"):
        data.data_path("wheel.txt", fetch=latin1)
    monkeypatch.delenv("SCRATCHLM_DATA")  # then the cache is the only place
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    assert data.data_path(relative, fetch=latin1) == tmp_path / "cache2" / "scratchlm" / relative


def test_read_text_drops_a_byte_order_mark_and_names_directories_and_bad_bytes(tmp_path):
    from scratchlm import data

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhi\xef\xbb\xbf")
    assert data.read_text(tmp_path / "bom.txt") == "hi\ufeff"
    with pytest.raises(ScratchLMError, match=re.escape(f"{tmp_path} is a directory, not a text file")):
        data.read_text(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"ab\xff\xfe")
    with pytest.raises(ScratchLMError, match=re.escape(r"is not UTF-8 text (byte 2: b'\xff')")):
        data.read_text(tmp_path / "bad.txt")


def test_gutenberg_text_between_the_markers_ends_with_one_newline():
    from scratchlm import data

    text = "*** END OF a note in the header\n*** START OF X ***\n\n body \n\n*** END OF X ***\nlicence\n"
    assert data.strip_gutenberg(text) == "body\n"


def test_split_fractions_and_tiny_texts():
    from scratchlm import data

    for fraction in (0.0, 1.0):
        with pytest.raises(ScratchLMError, match=f"val_fraction must be between 0 and 1, got {fraction}"):
            data.train_val_split("line\n" * 10, fraction)
    assert data.train_val_split("ab") == ("a", "b")
    with pytest.raises(ScratchLMError, match="text of 1 characters is too short to split"):
        data.train_val_split("a")


def test_top_level_help_says_what_the_package_is_and_lists_the_commands(capsys):
    from scratchlm.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m scratchlm [-h] COMMAND ...\n")
    description = "A language model from scratch: each command belongs to one chapter of the book."
    assert description in " ".join(out.split())  # argparse wraps it to the terminal
    assert "\ncommands:\n  COMMAND\n" in out and "    bigram " in out


def test_downloads_go_to_the_recorded_url_with_a_timeout_and_failures_are_one_line(tmp_path, monkeypatch):
    """No network: urlopen is replaced, to see what the default fetch asks for."""
    import urllib.request

    from scratchlm import data

    body = b"hello\n"
    relative = "tinyshakespeare/input.txt"
    monkeypatch.setitem(data.MANIFEST, relative, (hashlib.sha256(body).hexdigest(), "o/r:p.txt@abc"))
    calls = []

    class Response:
        def read(self):
            return body

    def urlopen(url, timeout=None):
        calls.append((url, timeout))
        return Response()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert data._download(relative, tmp_path / "x.txt").read_bytes() == body
    assert calls[0][0] == "https://raw.githubusercontent.com/o/r/abc/p.txt" and calls[0][1]

    def offline(url):
        raise OSError("network is unreachable")

    with pytest.raises(ScratchLMError, match=f"could not download {relative} from .*unreachable.*; set SCRATCHLM_DATA"):
        data._download(relative, tmp_path / "y.txt", fetch=offline)


def test_every_option_of_every_command_has_help_text():
    import argparse

    from conftest import assert_documented
    from scratchlm.cli import build_parser

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert_documented(*top.choices, description=False)
