"""Chapter 1: data loading, the character tokenizer, the count and neural bigram models, the bigram command."""

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import SHARED_DATA, require_data
from scratchlm import data
from scratchlm.bigram import CountBigram, NeuralBigram, bigram_counts, sample_chain, train_neural_bigram
from scratchlm.chars import CharTokenizer
from scratchlm.errors import ScratchLMError
from scratchlm.gradcheck import numerical_gradient, relative_error  # the book's checker (Chapter 4)

# ---------------------------------------------------------------- tokenizer


@given(st.text(min_size=1))
def test_round_trip_of_any_text_through_its_own_alphabet(text):
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert tokenizer.decode(ids) == text


@given(st.lists(st.integers(0, 9), max_size=50))
def test_ids_round_trip_through_text(ids):
    tokenizer = CharTokenizer("abcdefghi\U0001f600")
    assert tokenizer.encode(tokenizer.decode(ids)).tolist() == ids


def test_alphabet_is_sorted_so_ids_are_reproducible():
    assert CharTokenizer.from_text("banana").alphabet == "abn"


def test_unknown_character_is_refused_with_its_name_and_position():
    tokenizer = CharTokenizer.from_text("hello world")
    with pytest.raises(ScratchLMError, match=r"'é' \(U\+00E9\) at position 3"):
        tokenizer.encode("helé")
    with pytest.raises(ScratchLMError, match="position 0"):
        tokenizer.encode("\U0010ffff")  # beyond the lookup table entirely


def test_decode_refuses_out_of_range_ids():
    tokenizer = CharTokenizer("ab")
    with pytest.raises(ScratchLMError, match="token id 2 at position 1"):
        tokenizer.decode([0, 2])
    with pytest.raises(ScratchLMError, match="token id -1"):
        tokenizer.decode([-1])


def test_bad_alphabets_are_refused():
    with pytest.raises(ScratchLMError):
        CharTokenizer("")
    with pytest.raises(ScratchLMError):
        CharTokenizer("aa")


# ---------------------------------------------------------------- count bigram


def test_counts_sum_to_the_number_of_bigrams_and_match_a_loop():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 7, size=500)
    counts = bigram_counts(ids, 7)
    assert counts.sum() == len(ids) - 1
    expected = np.zeros((7, 7), dtype=np.int64)
    for a, b in zip(ids[:-1], ids[1:]):
        expected[a, b] += 1
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.5, 1.0])
def test_rows_sum_to_one(smoothing):
    model = CountBigram.fit([0, 1, 1, 2, 0, 1], 4, smoothing)  # id 3 never occurs: a row with no evidence
    np.testing.assert_allclose(model.probs.sum(axis=1), 1.0)


def test_nll_equals_a_hand_computation():
    # "abab" with k = 1 over V = 2: counts a->b 2, b->a 1. P(b|a) = 3/4, P(a|b) = 2/3.
    model = CountBigram.fit([0, 1, 0, 1], 2, smoothing=1.0)
    assert model.probs[0, 1] == pytest.approx(3 / 4) and model.probs[1, 0] == pytest.approx(2 / 3)
    # Held-out "aba": pairs a->b then b->a.
    expected = -(math.log(3 / 4) + math.log(2 / 3)) / 2
    assert model.nll([0, 1, 0]) == pytest.approx(expected)
    assert model.perplexity([0, 1, 0]) == pytest.approx(math.exp(expected))


def test_unsmoothed_unseen_pair_has_infinite_nll():
    model = CountBigram.fit([0, 1, 0, 1], 2, smoothing=0.0)
    assert model.nll([0, 0]) == math.inf


def test_bad_smoothing_and_ids_are_refused():
    with pytest.raises(ScratchLMError, match="smoothing"):
        CountBigram.fit([0, 1], 2, smoothing=-1)
    with pytest.raises(ScratchLMError, match="out of range"):
        CountBigram.fit([0, 5], 2)
    with pytest.raises(ScratchLMError, match="at least 2"):
        CountBigram.fit([0], 2)


def test_sampling_is_deterministic_given_the_seed_and_follows_the_table():
    model = CountBigram.fit(np.random.default_rng(0).integers(0, 5, 1000), 5)
    a = model.sample(300, np.random.default_rng(42), start=1)
    b = model.sample(300, np.random.default_rng(42), start=1)
    c = model.sample(300, np.random.default_rng(43), start=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A deterministic chain 0 -> 1 -> 2 -> 0 is followed exactly.
    cycle = np.roll(np.eye(3), 1, axis=1)
    assert sample_chain(cycle, 6, np.random.default_rng(0), start=0).tolist() == [1, 2, 0, 1, 2, 0]


# ---------------------------------------------------------------- neural bigram


def test_neural_bigram_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    model = NeuralBigram(5, rng)
    model.W[:] = rng.standard_normal((5, 5))
    x, y = rng.integers(0, 5, 40), rng.integers(0, 5, 40)  # many repeated rows: np.add.at must accumulate
    _, analytic = model.loss_and_grad(x, y)
    numeric = numerical_gradient(lambda: model.loss_and_grad(x, y)[0], model.W)
    assert relative_error(analytic, numeric) <= 1e-6


def test_count_form_equals_position_form():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, 300)
    model = NeuralBigram(6, rng)
    model.W[:] = rng.standard_normal((6, 6))
    loss_positions, grad_positions = model.loss_and_grad(ids[:-1], ids[1:])
    loss_counts, grad_counts = model.loss_and_grad_counts(bigram_counts(ids, 6))
    assert loss_counts == pytest.approx(loss_positions, rel=1e-12)
    np.testing.assert_allclose(grad_counts, grad_positions, rtol=1e-10, atol=1e-14)
    numeric = numerical_gradient(lambda: model.loss_and_grad_counts(bigram_counts(ids, 6))[0], model.W)
    assert relative_error(grad_counts, numeric) <= 1e-6


def test_gradient_descent_converges_to_the_count_model():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, 5000)
    counts = bigram_counts(ids, 4)
    model = NeuralBigram(4, np.random.default_rng(0))
    curve = train_neural_bigram(model, counts, ids, learning_rate=20.0, max_steps=3000, eval_every=500)
    np.testing.assert_allclose(model.probs(), CountBigram(counts, 0.0).probs, atol=1e-3)
    assert curve["val_nll"][-1] < curve["val_nll"][0]


def test_diverging_training_stops_with_a_clear_error():
    counts = bigram_counts(np.random.default_rng(0).integers(0, 4, 200), 4)
    model = NeuralBigram(4, np.random.default_rng(0))
    model.W[0, 0] = np.nan
    with pytest.raises(ScratchLMError, match="step 0"):
        train_neural_bigram(model, counts, [0, 1], learning_rate=1.0, max_steps=5)


def test_neural_bigram_reaches_the_count_model_on_shakespeare():
    require_data("tinyshakespeare/input.txt")
    text = data.corpus("tinyshakespeare")
    tokenizer = CharTokenizer.from_text(text)
    train, val = data.train_val_split(text)
    train_ids, val_ids = tokenizer.encode(train), tokenizer.encode(val)
    count_nll = CountBigram.fit(train_ids, tokenizer.vocab_size).nll(val_ids)
    model = NeuralBigram(tokenizer.vocab_size, np.random.default_rng(0))
    curve = train_neural_bigram(model, bigram_counts(train_ids, tokenizer.vocab_size), val_ids, 50.0, 10_000,
                                target_nll=count_nll + 0.01)
    assert curve["val_nll"][-1] <= count_nll + 0.01
    assert curve["step"][-1] < 10_000


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("relative", [p for p in data.MANIFEST if p.startswith("dostoevsky/")])
def test_gutenberg_header_and_footer_are_stripped_from_every_book(relative):
    require_data(relative)
    body = data.strip_gutenberg(data.read_text(data.data_path(relative)), relative)
    assert "Project Gutenberg" not in body[:2000] and "PROJECT GUTENBERG" not in body
    assert "Project Gutenberg" not in body[-3000:]
    assert len(body.split()) > 40_000


def test_notes_from_underground_is_counted_once():
    require_data(*[p for p in data.MANIFEST if p.startswith("dostoevsky/")])
    training = data.corpus("dostoevsky")
    assert training.count("NOTES FROM UNDERGROUND") == data.corpus("white-nights").count("NOTES FROM UNDERGROUND")
    assert "CRIME AND PUNISHMENT" not in training.upper() or "Raskolnikov" not in training


def test_corpora_named_in_the_book_exist():
    require_data("tinyshakespeare/input.txt", "dostoevsky/crime_and_punishment.txt")
    assert data.corpus("tinyshakespeare").startswith("First Citizen:")
    assert "Raskolnikov" in data.corpus("crime-and-punishment")


def test_missing_gutenberg_marker_is_an_error():
    with pytest.raises(ScratchLMError, match="START marker"):
        data.strip_gutenberg("just a text", "x.txt")
    with pytest.raises(ScratchLMError, match="END marker"):
        data.strip_gutenberg("*** START OF IT ***\nbody\n", "x.txt")


def test_missing_empty_and_non_utf8_files_get_clear_errors(tmp_path):
    with pytest.raises(ScratchLMError, match="no such file"):
        data.read_text(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ScratchLMError, match="empty"):
        data.read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ScratchLMError, match=r"not UTF-8 text \(byte 3"):
        data.read_text(tmp_path / "latin1.txt")
    with pytest.raises(ScratchLMError, match="unknown corpus"):
        data.corpus("no-such-corpus")


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ScratchLMError, match=str(tmp_path / "data")):
        data.data_path("tinyshakespeare/input.txt")


def test_download_is_verified_and_normalised(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    body = b"hello\nworld\n"
    relative = "tinyshakespeare/input.txt"
    monkeypatch.setitem(data.MANIFEST, relative, (hashlib.sha256(body).hexdigest(), "o/r:p.txt@abc"))
    urls = []
    fetched = data._download(relative, tmp_path / "x.txt", fetch=lambda url: urls.append(url) or b"\xef\xbb\xbfhello\r\nworld\r\n")
    assert fetched.read_bytes() == body and urls == ["https://raw.githubusercontent.com/o/r/abc/p.txt"]
    with pytest.raises(ScratchLMError, match="does not match"):
        data._download(relative, tmp_path / "y.txt", fetch=lambda url: b"tampered")
    assert not (tmp_path / "y.txt").exists()


def test_package_manifest_agrees_with_the_shared_manifest():
    manifest = require_data("MANIFEST.tsv") / "MANIFEST.tsv"
    rows = [line.split("\t") for line in manifest.read_text().splitlines()[1:]]
    recorded = {row[0]: row[2] for row in rows}
    for relative, (sha256, _) in data.MANIFEST.items():
        assert recorded[relative] == sha256, relative


def test_train_val_split_is_deterministic_and_cuts_at_a_line():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = data.train_val_split(text, 0.1)
    assert train + val == text and train.endswith("\n") and 0.05 < len(val) / len(text) < 0.15
    assert data.train_val_split(text, 0.1) == (train, val)
    with pytest.raises(ScratchLMError):
        data.train_val_split(text, 1.5)


# ---------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True)


def test_bigram_command_prints_one_json_object(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("abracadabra\n" * 200)
    done = _cli("bigram", "--corpus", str(text), "--json", "--sample", "30", "--seed", "3")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["vocab_size"] == 6 and len(result["sample"]) == 30 and result["val_nll"] > 0
    assert json.loads(_cli("bigram", "--corpus", str(text), "--json", "--sample", "30", "--seed", "3").stdout) == result


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corpus", "no-such-corpus"], "unknown corpus"),
        (["--corpus", "tinyshakespeare", "--smoothing", "-1"], "smoothing must be >= 0"),
        (["--corpus", "tinyshakespeare", "--smoothing", "x"], "invalid float value"),
    ],
)
def test_bigram_command_errors_are_one_line_with_exit_2(args, message):
    done = _cli("bigram", *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_bigram_command_reports_missing_data_with_the_path(tmp_path):
    env = {"PATH": "", "SCRATCHLM_DATA": str(tmp_path), "SCRATCHLM_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "scratchlm", "bigram", "--corpus", "tinyshakespeare"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and str(tmp_path) in done.stderr and len(done.stderr.strip().splitlines()) == 1
