"""Chapter 2: byte-level BPE (book/02_bpe.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_data
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.bpe import (
    SPECIAL_TOKENS,
    BPETokenizer,
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
