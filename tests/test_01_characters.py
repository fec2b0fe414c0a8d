"""Chapter 1: data loading, the character tokenizer, the count and neural bigram models, the bigram command."""

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA, require_data
from scratchlm import data
from scratchlm.bigram import CountBigram, NeuralBigram, bigram_counts, sample_chain, train_neural_bigram
from scratchlm.chars import CharTokenizer
from scratchlm.errors import ScratchLMError
from scratchlm.sentences import split_sentences
from scratchlm.gradcheck import numerical_gradient, relative_error  # the book's checker (Chapter 4)

# ---------------------------------------------------------------- tokenizer


@settings(deadline=None)  # timing is not what these test; a busy machine is slow
@given(st.text(min_size=1))
def test_round_trip_of_any_text_through_its_own_alphabet(text):
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert tokenizer.decode(ids) == text


@settings(deadline=None)
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


# ---------------------------------------------------------------- sentences


def test_a_full_stop_before_a_closing_quote_ends_a_sentence():
    # the first splitter of Chapter 1 looked only for a space right after the mark
    assert split_sentences("“Go.” He went.") == ["“Go.”", "He went."]
    assert split_sentences("‘Yes!’ (Quietly.) “Why?” Then.") == ["‘Yes!’", "(Quietly.)", "“Why?”", "Then."]


def test_a_lower_case_word_after_the_mark_continues_the_sentence():
    assert split_sentences("“Is it?” he asked. Wait... and see! Then") == [
        "“Is it?” he asked.",
        "Wait... and see!",
        "Then",
    ]


def test_whitespace_is_normalised_and_no_text_is_lost():
    text = "  One.\n\nTwo  lines\nof it?  3.14 is pi. Mr. Smith "
    sentences = split_sentences(text)
    assert sentences == ["One.", "Two lines of it?", "3.14 is pi.", "Mr.", "Smith"]
    assert " ".join(sentences) == " ".join(text.split())
    assert split_sentences("") == [] and split_sentences(" \n ") == []


@settings(deadline=None)
@given(st.text(alphabet="ab .!?”’\n", max_size=60))
def test_sentences_join_back_to_the_normalised_text(text):
    sentences = split_sentences(text)
    assert " ".join(sentences) == " ".join(text.split())
    assert all(sentence and sentence == sentence.strip() for sentence in sentences)


# ---------------------------------------------------------------- mutation testing (tests/MUTATION.md)


class _ZeroDraws:
    """A generator whose every uniform draw is exactly 0.0, the edge of inverse-CDF sampling."""

    def random(self, n):
        return np.zeros(n)


def test_sampling_starts_from_id_0_by_default_and_from_start_when_given():
    cycle = np.roll(np.eye(3), 1, axis=1)  # 0 -> 1 -> 2 -> 0
    model = CountBigram(np.roll(np.eye(3, dtype=np.int64), 1, axis=1), smoothing=0)
    assert model.sample(4, np.random.default_rng(0)).tolist() == [1, 2, 0, 1]
    assert model.sample(4, np.random.default_rng(0), start=2).tolist() == [0, 1, 2, 0]
    out = sample_chain(cycle, 3, np.random.default_rng(0))
    assert out.tolist() == [1, 2, 0] and np.issubdtype(out.dtype, np.integer)


def test_a_sample_of_length_zero_is_empty_and_a_negative_length_is_refused():
    cycle = np.roll(np.eye(3), 1, axis=1)
    assert sample_chain(cycle, 0, np.random.default_rng(0)).tolist() == []
    with pytest.raises(ScratchLMError, match="sample length must be >= 0, got -1"):
        sample_chain(cycle, -1, np.random.default_rng(0))


def test_a_token_of_probability_zero_is_never_drawn():
    probs = np.array([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert 0 not in sample_chain(probs, 10, _ZeroDraws()).tolist()


def test_sample_frequencies_follow_the_table():
    probs = np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    chain = sample_chain(probs, 30_000, np.random.default_rng(0), start=0)
    observed = bigram_counts(np.concatenate([[0], chain]), 3)
    observed = observed / observed.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(observed, probs, atol=0.02)


def test_default_smoothing_is_add_one():
    counts = np.array([[3, 0], [1, 1]])
    np.testing.assert_allclose(CountBigram(counts).probs, [[4 / 5, 1 / 5], [2 / 4, 2 / 4]])
    np.testing.assert_allclose(CountBigram.fit([0, 0, 0, 0, 1, 1, 0], 2).probs, [[4 / 6, 2 / 6], [2 / 4, 2 / 4]])


def test_models_score_two_ids_and_refuse_one():
    count = CountBigram.fit([0, 1, 0, 1], 2)
    neural = NeuralBigram(2, np.random.default_rng(0))
    for model in (count, neural):
        assert math.isfinite(model.nll([0, 1]))
        with pytest.raises(ScratchLMError, match="need at least 2 token ids, got 1"):
            model.nll([0])


def test_an_unseen_pair_scores_infinity_without_a_warning():
    import warnings

    model = CountBigram.fit([0, 0, 0], 2, smoothing=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.nll([0, 1]) == math.inf


def test_neural_bigram_loss_takes_one_position_and_refuses_none():
    model = NeuralBigram(3, np.random.default_rng(0))
    loss, grad = model.loss_and_grad([0], [2])
    assert math.isfinite(loss) and grad.shape == (3, 3)
    for x, y in [([], [1]), ([1], [])]:
        with pytest.raises(ScratchLMError, match="need at least 1 token ids, got 0"):
            model.loss_and_grad(x, y)


def test_neural_bigram_starts_near_uniform_in_the_dtype_asked_for():
    rng = np.random.default_rng(0)
    model = NeuralBigram(50, rng, dtype=np.float32)
    assert model.W.dtype == np.float32
    assert model.loss_and_grad_counts(np.ones((50, 50), np.int64))[1].dtype == np.float32
    ids = rng.integers(0, 50, 2000)
    assert abs(model.nll(ids) - math.log(50)) < 0.01  # small initial weights: every next id about 1/V


def test_training_logs_every_eval_every_steps_and_the_last():
    counts = bigram_counts(np.random.default_rng(0).integers(0, 4, 500), 4)
    model = NeuralBigram(4, np.random.default_rng(1))
    first_loss = model.loss_and_grad_counts(counts)[0]
    curve = train_neural_bigram(model, counts, [0, 1, 2, 3], learning_rate=1.0, max_steps=250)
    assert curve["step"] == [0, 100, 200, 250]
    assert curve["train_loss"][0] == first_loss and curve["train_loss"][-1] < first_loss
    assert len(curve["val_nll"]) == 4
    # the model handed back is the one the last point measured: max_steps updates
    assert model.nll([0, 1, 2, 3]) == curve["val_nll"][-1]
    assert model.loss_and_grad_counts(counts)[0] == curve["train_loss"][-1]


def test_training_stops_as_soon_as_the_target_is_reached():
    counts = bigram_counts([0, 1, 2, 3, 0], 4)
    model = NeuralBigram(4, np.random.default_rng(1))
    start_nll = model.nll([0, 1, 2, 3])
    curve = train_neural_bigram(model, counts, [0, 1, 2, 3], learning_rate=1.0, max_steps=50, target_nll=start_nll)
    assert curve["step"] == [0]


def test_bigram_command_scores_the_held_out_split_with_the_documented_defaults(tmp_path, capsys):
    """In-process, so that mutation testing sees the command's code run."""
    from scratchlm.cli import main

    path = tmp_path / "tiny.txt"
    text = "".join(f"abra{i % 7}cadabra\n" for i in range(300))
    path.write_text(text)
    tokenizer = CharTokenizer.from_text(text)
    train, val = data.train_val_split(text)
    model = CountBigram.fit(tokenizer.encode(train), tokenizer.vocab_size, 1.0)
    start = tokenizer.alphabet.index("\n")
    assert main(["bigram", "--corpus", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "corpus": str(path), "vocab_size": tokenizer.vocab_size, "smoothing": 1.0,
        "train_chars": len(train), "val_chars": len(val),
        "val_nll": pytest.approx(model.nll(tokenizer.encode(val)), rel=1e-12),
        "val_perplexity": pytest.approx(model.perplexity(tokenizer.encode(val)), rel=1e-12),
        "sample": tokenizer.decode(model.sample(200, np.random.default_rng(0), start)),
    }
    assert main(["bigram", "--corpus", str(path), "--smoothing", "0.5", "--sample", "7", "--seed", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    half = CountBigram.fit(tokenizer.encode(train), tokenizer.vocab_size, 0.5)
    assert lines[0] == f"{path}: {tokenizer.vocab_size} characters, {len(train):,} training / {len(val):,} held-out"
    assert lines[1] == (f"held-out NLL {half.nll(tokenizer.encode(val)):.4f} nats/char, perplexity "
                        f"{half.perplexity(tokenizer.encode(val)):.2f}")
    assert "\n".join(lines[2:]) == tokenizer.decode(half.sample(7, np.random.default_rng(2), start))


def test_check_ids_flattens_and_names_the_range():
    from scratchlm.chars import check_ids

    assert check_ids([[0, 1], [2, 0]], 3).tolist() == [0, 1, 2, 0]
    with pytest.raises(ScratchLMError) as caught:
        check_ids([0, 5], 3)
    assert str(caught.value) == "token id 5 at position 1 is out of range 0..2"


def test_characters_between_and_just_past_the_alphabet_are_refused():
    tokenizer = CharTokenizer("ac")
    for text in ["b", "d", "aab"]:  # "b" falls in a gap, "d" is one past the last code
        with pytest.raises(ScratchLMError, match="is not in the tokenizer's alphabet of 2 characters"):
            tokenizer.encode(text)
    with pytest.raises(ScratchLMError, match="is not in"):
        CharTokenizer("\x00").encode("\x00a")


def test_the_nul_character_round_trips():
    tokenizer = CharTokenizer("\x00a")
    assert tokenizer.decode(tokenizer.encode("a\x00a")) == "a\x00a"


def test_bad_alphabets_are_refused_with_the_reason():
    with pytest.raises(ScratchLMError, match="needs at least one character"):
        CharTokenizer("")
    with pytest.raises(ScratchLMError, match="repeated characters"):
        CharTokenizer("abca")


def test_bigram_command_options_in_process(tmp_path, capsys):
    from scratchlm.cli import main

    path = tmp_path / "tabs.txt"
    path.write_text("a\tb\nba\tab\n" * 100)  # "\t" sorts before "\n": the newline's id is 1
    tokenizer = CharTokenizer.from_text(path.read_text())
    train, _ = data.train_val_split(path.read_text())
    model = CountBigram.fit(tokenizer.encode(train), tokenizer.vocab_size, 0.0)
    assert main(["bigram", "--corpus", str(path), "--json", "--smoothing", "0", "--sample", "9"]) == 0
    expected = tokenizer.decode(model.sample(9, np.random.default_rng(0), start=1))
    assert json.loads(capsys.readouterr().out)["sample"] == expected
    no_newline = tmp_path / "flat.txt"
    no_newline.write_text("abcab" * 100)
    tokenizer = CharTokenizer.from_text(no_newline.read_text())
    train, val = data.train_val_split(no_newline.read_text())
    model = CountBigram.fit(tokenizer.encode(train), tokenizer.vocab_size)
    start = int(tokenizer.encode(val)[0])  # no newline: the sample follows the held-out text's first id
    assert main(["bigram", "--corpus", str(no_newline), "--json", "--sample", "9"]) == 0
    expected = tokenizer.decode(model.sample(9, np.random.default_rng(0), start=start))
    assert json.loads(capsys.readouterr().out)["sample"] == expected
    assert main(["bigram", "--corpus", str(path), "--smoothing", "-1"]) == 2
    assert capsys.readouterr().err == "error: --smoothing must be >= 0, got -1.0\n"
    with pytest.raises(SystemExit) as stopped:
        main(["bigram"])
    assert stopped.value.code == 2 and "--corpus" in capsys.readouterr().err
