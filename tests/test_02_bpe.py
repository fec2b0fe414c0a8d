"""Chapter 2: byte-level BPE (book/02_bpe.md)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_documented, require_data
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.bpe import (
    SPECIAL_TOKENS,
    BPETokenizer,
    benchmark,
    merge,
    merges_digest,
    train_fast,
    train_naive,
)
from scratchlm.errors import ScratchLMError
from scratchlm.pretokenize import pretokenize

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. “You’re late,” he said; it's 1866.\n"
    "Раскольников вышел на улицу. Café au lait, naïve façade. 漢字かな交じり文 🙂🙃\n"
    "    indented   spaces\t\ttabs\n\n_italics_ and 3.14159 and 1,000,000!\n"
) * 20


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(SAMPLE, 400)


@given(st.text())
def test_pretokens_join_back_to_the_text(text):
    assert "".join(pretokenize(text)) == text


def test_pretokenizer_splits_words_numbers_and_contractions():
    assert pretokenize("You’re 12345 naïve_x!!") == ["You", "’re", " 123", "45", " naïve", "_", "x", "!!"]
    assert pretokenize("a   b") == ["a", "  ", " b"]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_of_arbitrary_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allowed_special="all")) == text


def test_merge_replaces_left_to_right_without_overlap():
    assert merge([1, 1, 1], (1, 1), 9) == [9, 1]
    assert merge([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert merge([3, 4], (1, 2), 9) == [3, 4]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab c", min_size=1, max_size=8), min_size=1, max_size=40), st.integers(1, 30))
def test_naive_and_fast_agree_even_with_many_ties(words, n_merges):
    chunks = [w.encode("utf-8") for w in words]
    assert train_naive(chunks, n_merges, 256) == train_fast(chunks, n_merges, 256)


def test_naive_and_fast_agree_on_shakespeare():
    require_data("tinyshakespeare/input.txt")
    from scratchlm.data import corpus

    text = corpus("tinyshakespeare")[:60_000]
    naive = BPETokenizer.train(text, 400, trainer=train_naive)
    fast = BPETokenizer.train(text, 400, trainer=train_fast)
    assert len(fast.merges) == 400 - 260
    assert naive.merges == fast.merges


def test_ties_do_not_depend_on_order():
    chunks = [w.encode() for w in "ab ba cd dc ab cd ba dc".split()]
    assert train_fast(chunks, 6, 256) == train_fast(chunks[::-1], 6, 256) == train_naive(chunks[::-1], 6, 256)


def test_training_stops_when_nothing_is_left_to_merge():
    tok = BPETokenizer.train("aaaa", 1000)
    assert tok.vocab_size == 260 + len(tok.merges) and tok.vocab_size < 1000
    assert tok.encode("aaaa") == [tok.vocab_size - 1]


def test_merges_never_cross_pretokens(tokenizer):
    for token in tokenizer.vocab[260:]:
        text = token.decode("utf-8", errors="replace")
        assert len(pretokenize(text)) <= 1 or "\ufffd" in text


def test_special_tokens_have_reserved_ids_and_are_never_split(tokenizer):
    assert tokenizer.special_tokens == {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    ids = tokenizer.encode("hi<|user|>yo<|endoftext|>", allowed_special="all")
    assert ids.count(257 + 1) == 1 and ids[-1] == 256
    assert tokenizer.decode(ids) == "hi<|user|>yo<|endoftext|>"
    assert tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [256]


def test_special_tokens_in_plain_text_are_an_error_unless_allowed(tokenizer):
    with pytest.raises(ScratchLMError, match=r"<\|assistant\|>"):
        tokenizer.encode("say <|assistant|> now")
    with pytest.raises(ScratchLMError, match="<|user|>"):
        tokenizer.encode("<|user|>", allowed_special={"<|endoftext|>"})
    with pytest.raises(ScratchLMError, match="<|bogus|>"):
        tokenizer.encode("x", allowed_special={"<|bogus|>"})
    ordinary = tokenizer.encode_ordinary("<|endoftext|>")
    assert 256 not in ordinary and len(ordinary) > 1


def test_training_never_learns_pieces_of_special_tokens():
    tok = BPETokenizer.train("hello world<|endoftext|>" * 50, 300)
    assert not any(b"endoftext" in token for token in tok.vocab[260:])


def test_decode_of_a_cut_off_character_does_not_crash(tokenizer):
    ids = tokenizer.encode("naïve")
    data = tokenizer.decode_bytes(ids)
    assert tokenizer.decode(list(data[:3])) == "na\ufffd"  # 'ï' is two bytes; keep only the first


@pytest.mark.parametrize("bad", [-1, 10_000, "3", 1.5, True, None])
def test_invalid_ids_name_the_value(tokenizer, bad):
    with pytest.raises(ScratchLMError, match="invalid token id"):
        tokenizer.decode([65, bad])


@pytest.mark.parametrize("size", [0, 259, "4096", 300.0, True])
def test_invalid_vocab_size(size):
    with pytest.raises(ScratchLMError, match="vocab_size"):
        BPETokenizer.train("some text", size)


def test_invalid_merges_and_specials():
    with pytest.raises(ScratchLMError, match="merge 0"):
        BPETokenizer([(260, 97)])
    with pytest.raises(ScratchLMError, match="merge 1"):
        BPETokenizer([(97, 98), (256, 97)])  # 256 is <|endoftext|>, not a merge
    with pytest.raises(ScratchLMError, match="special tokens"):
        BPETokenizer([], special_tokens=["<|a|>", "<|a|>"])
    with pytest.raises(ScratchLMError, match="pattern"):
        BPETokenizer([], pattern="(")


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "model.bpe"
    tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tokenizer.merges
    assert loaded.special_tokens == tokenizer.special_tokens and loaded.pattern == tokenizer.pattern
    assert loaded.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert "pickle" not in path.read_text(encoding="utf-8")


def test_every_truncation_of_a_model_file_is_a_clear_error(tmp_path):
    BPETokenizer.train("the theme of the thesis " * 5, 270).save(tmp_path / "m.bpe")
    text = (tmp_path / "m.bpe").read_text(encoding="utf-8")
    for cut in range(len(text)):
        (tmp_path / "cut.bpe").write_text(text[:cut], encoding="utf-8")
        with pytest.raises(ScratchLMError):
            BPETokenizer.load(tmp_path / "cut.bpe")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"merges": []}\n',
        b"\xff\xfe garbage",
        b'scratchlm-bpe 1\npattern "x"\nspecials 0\nmerges 1\n97\n',
        b'scratchlm-bpe 1\npattern "x"\nspecials 0\nmerges 1\n97 999\n',
        b'scratchlm-bpe 1\npattern "("\nspecials 0\nmerges 0\n',
        b'scratchlm-bpe 1\npattern "x"\nspecials two\nmerges 0\n',
    ],
)
def test_malformed_model_files(tmp_path, content):
    (tmp_path / "bad.bpe").write_bytes(content)
    with pytest.raises(ScratchLMError):
        BPETokenizer.load(tmp_path / "bad.bpe")


@pytest.mark.parametrize(
    "merges, wrong",
    [
        ("merges 2\n97 98\n258 97\n", "merge 1 (258, 97) uses token 258"),  # a token not yet made
        ("merges 2\n97 98\n", "promises 2 merges but holds 1"),  # the count disagrees
        ("merges 1\n97 98 99\n", ":5: malformed"),  # three ids where a merge has two
    ],
)
def test_a_model_file_whose_merges_disagree_with_its_header_is_refused(tmp_path, merges, wrong):
    path = tmp_path / "bad.bpe"
    path.write_text('scratchlm-bpe 1\npattern "x"\nspecials 0\n' + merges, encoding="utf-8")
    with pytest.raises(ScratchLMError) as caught:
        BPETokenizer.load(path)
    assert str(caught.value).startswith(str(path)) and wrong in str(caught.value)


def test_missing_model_file(tmp_path):
    with pytest.raises(ScratchLMError, match="no such model file"):
        BPETokenizer.load(tmp_path / "nope.bpe")


def _cli(*args, stdin=""):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", "bpe", *args], input=stdin.encode(), capture_output=True, env=env
    )


def test_cli_train_encode_decode(tmp_path):
    (tmp_path / "corpus.txt").write_text(SAMPLE, encoding="utf-8")
    model = tmp_path / "m.bpe"
    trained = _cli("train", "--corpus", str(tmp_path / "corpus.txt"), "--vocab-size", "300", "--out", str(model), "--json")
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["vocab_size"] == 300
    encoded = _cli("encode", "--model", str(model), "--json", stdin="Café 🙂 naïve")
    ids = json.loads(encoded.stdout)["ids"]
    for ids_text in (" ".join(map(str, ids)), encoded.stdout.decode()):
        decoded = _cli("decode", "--model", str(model), stdin=ids_text)
        assert decoded.stdout.decode("utf-8") == "Café 🙂 naïve"
    special = _cli("encode", "--model", str(model), "--allow-special", stdin="a<|endoftext|>")
    assert special.stdout.split()[-1] == b"256"


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (("decode",), "65 99999", b"invalid token id 99999"),
        (("decode",), "65 abc", b"not a token id: 'abc'"),
        (("encode",), "a<|user|>", b"special token"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, stdin, message):
    BPETokenizer.train(SAMPLE, 280).save(tmp_path / "m.bpe")
    result = _cli(*args, "--model", str(tmp_path / "m.bpe"), stdin=stdin)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count(b"\n") == 1


def test_cli_missing_model_is_exit_2(tmp_path):
    result = _cli("decode", "--model", str(tmp_path / "missing.bpe"), stdin="1 2")
    assert result.returncode == 2 and b"no such model file" in result.stderr


def test_recorded_run_still_reproduces():
    """The record's fast-trainer merges must be what the code trains today (the naive half is not re-run)."""
    from scratchlm.data import corpus
    from scratchlm.runs import read_record

    path = ROOT / "book" / "_runs" / "bpe_naive_vs_fast.json"
    if not path.exists():
        pytest.skip("no run record yet")
    record = read_record(path)
    require_data("tinyshakespeare/input.txt")
    config = record["config"]
    tok = BPETokenizer.train(corpus(config["corpus"]), config["vocab_size"])
    first = [tok.vocab[260 + k].decode("utf-8", "replace") for k in range(len(record["samples"]))]
    assert first == record["samples"]
    assert merges_digest(tok.merges) == record["metrics"]["merges_sha256"]
    assert record["metrics"]["merges_identical"] is True


def test_text_utf8_cannot_encode_is_a_clear_error(tokenizer):
    with pytest.raises(ScratchLMError, match="UTF-8 cannot encode"):
        tokenizer.encode("lone \ud800 surrogate")
    with pytest.raises(ScratchLMError, match="UTF-8 cannot encode"):
        BPETokenizer.train("lone \ud800 surrogate", 300)


@pytest.mark.parametrize(
    "book, mark",
    [
        ("brothers-karamazov", "’"),
        ("the-idiot", "’"),
        ("crime-and-punishment", "’"),
        ("the-possessed", "'"),
        ("white-nights", "'"),
    ],
)
def test_the_translations_disagree_about_the_apostrophe(book, mark):
    """Chapter 2's reason for accepting both marks in contractions, pinned per book."""
    import re

    from scratchlm.data import BOOKS, corpus

    require_data(BOOKS[book])
    marks = re.findall(r"[^\W\d_](['’])(?:s|t|re|ve|m|ll|d)\b", corpus(book))
    assert max(set(marks), key=marks.count) == mark
    # and the pre-tokenizer makes the same chunk boundaries with either mark
    assert pretokenize(f"don{mark}t") == ["don", f"{mark}t"]


# ---- the commands, in process (so that mutation testing sees which tests reach them) ----


def _main(capsys, monkeypatch, *argv, stdin=b""):
    """Run ``python -m scratchlm bpe ...`` in this process: (exit status, stdout, stderr)."""
    import io

    from scratchlm.cli import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    monkeypatch.setattr(sys, "argv", ["scratchlm", "bpe", *map(str, argv)])
    code = main(["bpe", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.bpe"
    BPETokenizer.train(SAMPLE, 300).save(path)
    return path


@pytest.mark.parametrize("trainer", ["fast", "naive"])
def test_train_command_writes_the_model_it_reports(capsys, monkeypatch, tmp_path, trainer):
    (tmp_path / "corpus.txt").write_text(SAMPLE, encoding="utf-8")
    out = tmp_path / "m.bpe"
    code, stdout, _ = _main(capsys, monkeypatch, "train", "--corpus", tmp_path / "corpus.txt", "--vocab-size",
                            300, "--out", out, "--trainer", trainer, "--json")
    summary = json.loads(stdout)
    assert code == 0 and set(summary) == {"out", "vocab_size", "n_merges", "seconds"}
    assert summary["out"] == str(out) and summary["vocab_size"] == 300 and summary["n_merges"] == 40
    assert 0 <= summary["seconds"] < 3  # 40 merges of 5 kB take a few hundredths of a second
    assert BPETokenizer.load(out).merges == BPETokenizer.train(SAMPLE, 300).merges
    code, stdout, _ = _main(capsys, monkeypatch, "train", "--corpus", tmp_path / "corpus.txt", "--vocab-size",
                            280, "--out", out)
    assert code == 0 and BPETokenizer.load(out).vocab_size == 280
    assert stdout.startswith(f"trained a 280-token vocabulary on {tmp_path / 'corpus.txt'} in ")
    assert stdout.rstrip().endswith(f" s -> {out}") and stdout.count("\n") == 1


def test_train_and_bench_commands_default_to_tiny_shakespeare_and_need_their_arguments(tmp_path):
    from scratchlm.cli import build_parser

    args = build_parser().parse_args(["bpe", "train", "--out", str(tmp_path / "m.bpe")])
    assert (args.corpus, args.vocab_size, args.trainer, args.json) == ("tinyshakespeare", 4096, "fast", False)
    args = build_parser().parse_args(["bpe", "bench"])
    assert (args.corpus, args.vocab_size, args.naive_vocab_size, args.record, args.json) == (
        "tinyshakespeare", 4096, 512, None, False)
    for argv in (["bpe", "train"], ["bpe", "encode"], ["bpe", "decode"], ["bpe"],
                 ["bpe", "train", "--out", "x", "--trainer", "slow"]):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(argv)
        assert caught.value.code == 2


def test_encode_command_prints_ids_or_a_json_summary(capsys, monkeypatch, model_path):
    tok = BPETokenizer.load(model_path)
    text = "Café 🙂 naïve"
    code, stdout, _ = _main(capsys, monkeypatch, "encode", "--model", model_path, stdin=text.encode())
    assert code == 0 and stdout == " ".join(map(str, tok.encode(text))) + "\n"
    code, stdout, _ = _main(capsys, monkeypatch, "encode", "--model", model_path, "--json", stdin=text.encode())
    assert code == 0 and json.loads(stdout) == {
        "ids": tok.encode(text), "n_tokens": len(tok.encode(text)), "n_bytes": len(text.encode("utf-8"))}
    code, stdout, _ = _main(capsys, monkeypatch, "encode", "--model", model_path, "--allow-special",
                            stdin=b"a<|user|>b")
    assert code == 0 and stdout.split() == [str(i) for i in tok.encode("a<|user|>b", allowed_special="all")]
    code, _, stderr = _main(capsys, monkeypatch, "encode", "--model", model_path, stdin=b"a<|user|>b")
    assert code == 2 and "<|user|>" in stderr and stderr.count("\n") == 1


def test_commands_refuse_input_that_is_not_utf8_naming_the_byte(capsys, monkeypatch, model_path):
    code, _, stderr = _main(capsys, monkeypatch, "encode", "--model", model_path, stdin=b"ab\xffcd")
    assert code == 2 and stderr == "error: standard input is not UTF-8 (byte 2: b'\\xff')\n"


@pytest.mark.parametrize("ids_text", ["72 105", " 72\n105 ", "[72, 105]", ' {"ids": [72, 105], "n_tokens": 2}'])
def test_decode_command_reads_ids_as_encode_prints_them(capsys, monkeypatch, model_path, ids_text):
    code, stdout, _ = _main(capsys, monkeypatch, "decode", "--model", model_path, stdin=ids_text.encode())
    assert code == 0 and stdout == "Hi"
    code, stdout, _ = _main(capsys, monkeypatch, "decode", "--model", model_path, "--json",
                            stdin=ids_text.encode())
    assert code == 0 and stdout == '{"text": "Hi"}\n'


def test_decode_command_writes_utf8_and_json_keeps_it_readable(capsys, monkeypatch, model_path):
    ids = BPETokenizer.load(model_path).encode("naïve 🙂")
    code, stdout, _ = _main(capsys, monkeypatch, "decode", "--model", model_path, "--json",
                            stdin=json.dumps(ids).encode())
    assert code == 0 and stdout == '{"text": "naïve 🙂"}\n'


@pytest.mark.parametrize(
    "ids_text, message",
    [
        ("[72, ", "token ids are not valid JSON"),
        ('{"id": [72]}', "JSON token ids must be a list, or an object with an 'ids' list"),
        ('{"ids": 72}', "JSON token ids must be a list"),
        ("72 1e3", "not a token id: '1e3' at position 1"),
        ("72 " + "x" * 100, "not a token id: '" + "x" * 40 + "' at position 1"),
        ("[72, 99999]", "invalid token id 99999 at position 1"),
    ],
)
def test_decode_command_bad_ids_are_one_line_errors(capsys, monkeypatch, model_path, ids_text, message):
    code, stdout, stderr = _main(capsys, monkeypatch, "decode", "--model", model_path, stdin=ids_text.encode())
    assert code == 2 and stdout == "" and message in stderr and stderr.count("\n") == 1


def test_benchmark_compares_both_trainers_on_one_text_and_times_encoding():
    result = benchmark(SAMPLE, 400, 384)
    metrics, curves = result["metrics"], result["curves"]
    tok = BPETokenizer.train(SAMPLE, 400)
    n_bytes = len(SAMPLE.encode("utf-8"))
    assert metrics["vocab_size"] == 400 and metrics["n_merges"] == 140 and metrics["naive_vocab_size"] == 384
    assert metrics["merges_identical"] is True and metrics["round_trip"] is True
    assert metrics["merges_sha256"] == merges_digest(tok.merges)
    assert metrics["corpus_bytes"] == n_bytes
    assert metrics["bytes_per_token"] == round(n_bytes / len(tok.encode_ordinary(SAMPLE)), 4)
    assert metrics["encode_mb_per_s"] > 0
    # the fast trainer passes the naive one's size before it finishes; the naive one is the slower
    assert 0 < metrics["fast_seconds_at_naive_vocab_size"] <= metrics["fast_seconds"] < 2
    assert metrics["naive_seconds"] > metrics["fast_seconds_at_naive_vocab_size"]
    assert metrics["speedup"] == pytest.approx(
        metrics["naive_seconds"] / metrics["fast_seconds_at_naive_vocab_size"], rel=0.05)
    # the curves hold the sizes both trainers passed, in order: here 300 (a checkpoint) and 384
    assert curves["vocab_size"] == [300, 384]
    assert curves["naive_seconds"][-1] == metrics["naive_seconds"]
    assert curves["fast_seconds"][-1] == metrics["fast_seconds_at_naive_vocab_size"]
    assert all(a < b for a, b in zip(curves["naive_seconds"], curves["naive_seconds"][1:]))
    assert len(curves["fast_seconds"]) == 2 and curves["fast_seconds"][0] <= curves["fast_seconds"][1]
    assert result["samples"] == [tok.vocab[260 + k].decode("utf-8", "replace") for k in range(20)]


def test_benchmark_of_a_text_with_few_merges_compares_what_there_is():
    # "abab ..." has at most a handful of merges: both trainers stop early, at the same size
    result = benchmark("abab abab abab", 300, 280)
    metrics = result["metrics"]
    assert metrics["naive_vocab_size"] == metrics["vocab_size"] == 260 + metrics["n_merges"] < 280
    assert metrics["merges_identical"] is True
    assert len(result["samples"]) == metrics["n_merges"]


@pytest.mark.parametrize("naive, fast", [(260, 300), (259, 300), (301, 300)])
def test_benchmark_needs_a_naive_size_with_a_merge_and_no_larger_than_the_fast_one(naive, fast):
    with pytest.raises(ScratchLMError, match=f"between 261 and {fast}, got {naive}"):
        benchmark(SAMPLE, fast, naive)


def test_bench_command_prints_the_comparison_and_records_it(capsys, monkeypatch, tmp_path):
    from scratchlm.runs import read_record

    (tmp_path / "corpus.txt").write_text(SAMPLE, encoding="utf-8")
    record = tmp_path / "bench.json"
    args = ("bench", "--corpus", tmp_path / "corpus.txt", "--vocab-size", 300, "--naive-vocab-size", 280)
    code, stdout, _ = _main(capsys, monkeypatch, *args, "--json", "--record", record)
    metrics = json.loads(stdout)
    assert code == 0 and metrics["vocab_size"] == 300 and metrics["naive_vocab_size"] == 280
    saved = read_record(record)
    assert saved["config"] == {"corpus": str(tmp_path / "corpus.txt"), "vocab_size": 300, "naive_vocab_size": 280}
    assert saved["metrics"] == metrics and saved["curves"]["vocab_size"] == [280]
    assert saved["samples"] == [BPETokenizer.train(SAMPLE, 300).vocab[260 + k].decode("utf-8", "replace")
                                for k in range(20)]
    assert saved["command"].startswith("python -m scratchlm bpe bench") and saved["elapsed_seconds"] >= 0
    assert 0 <= saved["elapsed_seconds"] < 60
    code, stdout, _ = _main(capsys, monkeypatch, *args, "--record", tmp_path / "text.json")
    lines, metrics = stdout.splitlines(), read_record(tmp_path / "text.json")["metrics"]
    assert f"speed-up {metrics['speedup']:.1f}x ({metrics['speedup'] / 50:.1f}x the 50x target)" in lines[1]
    assert code == 0 and len(lines) == 4
    assert re.fullmatch(r"fast trainer:  vocab 300 in \d+\.\d\d s", lines[0])
    assert re.fullmatch(r"naive trainer: vocab 280 in \d+\.\d\d s, fast \d+\.\d\d s: speed-up \d+\.\dx "
                        r"\(\d+\.\dx the 50x target\)", lines[1])
    assert lines[2] == "merges identical: True; round trip: True"
    assert re.fullmatch(r"encode: \d+\.\d\d MB/s \(\d+\.\dx the 1 MB/s target\), \d\.\d\d bytes/token", lines[3])
    assert not (tmp_path / "other.json").exists()


# ---- what the error messages and the model file say ----------------------------------


def test_a_tokenizer_without_special_tokens_encodes_every_string_as_text():
    tok = BPETokenizer.train("hello hello <|endoftext|>", 262, special_tokens=[])
    assert tok.vocab_size == 262 and tok.special_tokens == {}
    ids = tok.encode("hello <|endoftext|>", allowed_special="all")
    assert ids == tok.encode_ordinary("hello <|endoftext|>") and tok.decode(ids) == "hello <|endoftext|>"


def test_a_refused_special_token_is_named_with_its_position(tokenizer):
    with pytest.raises(ScratchLMError, match=r"the special token '<\|assistant\|>' at character 4; allow it"):
        tokenizer.encode("say <|assistant|> now")
    with pytest.raises(ScratchLMError, match=r"'<\|user\|>' at character 17;"):
        tokenizer.encode("ab<|endoftext|>cd<|user|>", allowed_special={"<|endoftext|>"})


def test_the_first_id_past_the_vocabulary_is_refused_with_the_valid_range(tokenizer):
    with pytest.raises(ScratchLMError, match=r"^invalid token id 400 at position 1: ids run from 0 to 399$"):
        tokenizer.decode([65, tokenizer.vocab_size])


def test_loading_a_directory_or_a_file_that_is_not_utf8_says_what_is_wrong(tmp_path):
    with pytest.raises(ScratchLMError, match=f"^{tmp_path} is not a BPE model file: "):
        BPETokenizer.load(tmp_path)
    (tmp_path / "bin.bpe").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ScratchLMError, match="bin.bpe is not a BPE model file: .*utf-8"):
        BPETokenizer.load(tmp_path / "bin.bpe")


def test_model_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "m.bpe"
    path.write_text("x" * 100 + "\nmore\n", encoding="utf-8")
    with pytest.raises(ScratchLMError) as caught:
        BPETokenizer.load(path)
    assert str(caught.value) == f"{path} is not a BPE model file: first line {'x' * 40!r}, not 'scratchlm-bpe 1'"
    path.write_text('scratchlm-bpe 1\npattern "x"\nspecials 0\nmerges 0', encoding="utf-8")
    with pytest.raises(ScratchLMError, match="^.*m.bpe is truncated: it does not end with a newline$"):
        BPETokenizer.load(path)


@pytest.mark.parametrize(
    "text, line",
    [
        ('scratchlm-bpe 1\npattern x\nspecials 0\nmerges 0\n', 2),
        ('scratchlm-bpe 1\npattern "x"\nspecials two\nmerges 0\n', 3),
        ('scratchlm-bpe 1\npattern "x"\nspecials 2\n"<|a|>"\n<|b|>\nmerges 0\n', 5),
        ('scratchlm-bpe 1\npattern "x"\nspecials 1\n"<|a|>"\nmerges one\n', 5),
        ('scratchlm-bpe 1\npattern "x"\nspecials 0\nmerges 2\n97 98\n97\n', 6),
    ],
)
def test_a_malformed_model_line_is_named_by_its_number(tmp_path, text, line):
    path = tmp_path / "m.bpe"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScratchLMError, match=f"^{path}:{line}: malformed model line"):
        BPETokenizer.load(path)


def test_the_model_file_is_readable_text_and_a_hash_inside_a_token_is_no_comment(tmp_path):
    tok = BPETokenizer.train("## #1 ## naïve ## naïve " * 10, 270, special_tokens=["<|начало|>"],
                             pattern=r"\S+|\s+|…")
    path = tmp_path / "m.bpe"
    tok.save(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[:4] == ["scratchlm-bpe 1", r'pattern "\\S+|\\s+|…"', "specials 1", '"<|начало|>"']
    assert lines[4] == f"merges {len(tok.merges)}" and len(lines) == 5 + len(tok.merges)
    for k, ((first, second), line) in enumerate(zip(tok.merges, lines[5:])):
        token = tok.vocab[257 + k].decode("utf-8", "replace")
        assert line == f"{first} {second}  # {json.dumps(token, ensure_ascii=False)}"
    assert "naïve" in text and any("#" in token.decode() for token in tok.vocab[257:])
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_tokens == {"<|начало|>": 256}
    assert loaded.pattern == r"\S+|\s+|…"


@pytest.mark.parametrize("trainer", [train_fast, train_naive])
def test_training_reports_the_vocabulary_size_after_every_merge(trainer):
    sizes = []
    tok = BPETokenizer.train(SAMPLE, 270, trainer=trainer, on_merge=sizes.append)
    assert sizes == list(range(261, 271)) and tok.vocab_size == 270
    sizes = []
    BPETokenizer.train("abab", 300, trainer=trainer, on_merge=sizes.append)  # stops after two merges
    assert sizes == [261, 262]


def test_a_fresh_tokenizer_numbers_its_special_tokens_after_the_bytes():
    tok = BPETokenizer([])
    assert tok.special_tokens == {"<|endoftext|>": 256, "<|system|>": 257, "<|user|>": 258, "<|assistant|>": 259}
    assert tok.decode([257, 255]) == "<|system|>\ufffd" and tok.vocab[255] == b"\xff"
    assert tok.encode("<|assistant|>\xff", allowed_special="all") == [259, 195, 191]


@pytest.mark.parametrize("specials", [[""], ["<|a|>", ""], [1], ["<|a|>", None]])
def test_special_tokens_must_be_non_empty_strings(specials):
    with pytest.raises(ScratchLMError, match="special tokens must be distinct non-empty strings"):
        BPETokenizer([], special_tokens=specials)


def test_a_merge_may_use_byte_zero_and_the_last_byte():
    tok = BPETokenizer([(0, 0), (255, 260)])
    assert tok.encode("\0\0") == [260] and tok.vocab[261] == b"\xff\0\0"


def test_training_cuts_the_text_with_the_given_pattern_and_keeps_it():
    text = "to be or not to be " * 20
    spaced = BPETokenizer.train(text, 280, pattern=r"\S+|\s+")
    assert spaced.pattern == r"\S+|\s+"
    assert not any(b" " in token and token.strip(b" ") for token in spaced.vocab[260:])
    default = BPETokenizer.train(text, 280)
    assert any(token.startswith(b" ") and token.strip(b" ") for token in default.vocab[260:])  # " be", " not"


def test_a_vocabulary_of_bytes_and_special_tokens_only_is_allowed():
    tok = BPETokenizer.train(SAMPLE, 260)
    assert tok.merges == [] and tok.vocab_size == 260 and tok.encode("ab") == [97, 98]


@pytest.mark.parametrize("naive, fast", [(261, 261), (261, 262), (262, 262)])
def test_benchmark_accepts_one_merge_and_a_naive_size_equal_to_the_fast_one(naive, fast):
    metrics = benchmark(SAMPLE, fast, naive)["metrics"]
    assert metrics["naive_vocab_size"] == naive and metrics["vocab_size"] == fast and metrics["merges_identical"]


def test_encoding_speed_is_the_corpus_bytes_over_the_encoding_time(monkeypatch):
    import scratchlm.bpe as bpe

    clock = iter(range(0, 10_000, 2))  # every reading of the clock is two seconds after the last
    monkeypatch.setattr(bpe.time, "perf_counter", lambda: next(clock))
    metrics = benchmark(SAMPLE, 270, 265)["metrics"]
    assert metrics["encode_mb_per_s"] == round(5400 / 1e6 / 2, 3)  # one reading before encoding, one after
    assert metrics["fast_seconds"] > 0 and metrics["naive_seconds"] > 0


def test_a_special_token_is_matched_whole_before_a_shorter_one_it_starts_with():
    tok = BPETokenizer([], special_tokens=["<|a", "<|ab|>"])
    assert tok.encode("<|ab|><|a", allowed_special="all") == [257, 256]


def test_every_option_of_the_bpe_commands_says_what_it_does_in_help():
    assert_documented("bpe")


def test_the_record_keeps_times_to_a_tenth_of_a_millisecond_and_speeds_to_their_stated_digits(
        capsys, monkeypatch, tmp_path):
    import itertools

    import scratchlm.bpe as bpe

    ticks = itertools.count(1)
    monkeypatch.setattr(bpe.time, "perf_counter", lambda: next(ticks) ** 1.5 * 0.0123457)  # a clock with many digits
    result = benchmark(SAMPLE, 400, 384)

    def has_digits(value, digits):
        return isinstance(value, float) and value == round(value, digits) and value != round(value, digits - 1)

    metrics = result["metrics"]
    for key, digits in [("fast_seconds", 4), ("naive_seconds", 4), ("fast_seconds_at_naive_vocab_size", 4),
                        ("speedup", 2), ("encode_mb_per_s", 3)]:
        assert has_digits(metrics[key], digits), (key, metrics[key])
    assert all(has_digits(s, 4) for s in result["curves"]["naive_seconds"] + result["curves"]["fast_seconds"])
    (tmp_path / "corpus.txt").write_text(SAMPLE, encoding="utf-8")
    code, stdout, _ = _main(capsys, monkeypatch, "train", "--corpus", tmp_path / "corpus.txt", "--vocab-size", 300,
                            "--out", tmp_path / "m.bpe", "--json")
    assert code == 0 and has_digits(json.loads(stdout)["seconds"], 3)
