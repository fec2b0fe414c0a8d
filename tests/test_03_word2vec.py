"""Chapter 3: skip-gram with negative sampling, its sampler, its scatter-add, its queries and its records."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_data
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.embedding_eval import WordVectors, evaluate_analogies, ranks, spearman
from scratchlm.errors import ScratchLMError
from scratchlm.files import save_arrays
from scratchlm.word2vec import (
    AliasSampler,
    SkipGram,
    Vocabulary,
    Word2VecConfig,
    keep_probabilities,
    load_model,
    negative_distribution,
    save_model,
    scatter_add,
    sgns_backward,
    sgns_forward,
    skipgram_pairs,
    step_loop,
    tokenize,
    train,
)

TEXT = ("the cat sat on the mat and the dog sat on the log . " * 30).split()


def small_run(seed=0, **changes):
    vocab = Vocabulary.build(TEXT, 1)
    config = Word2VecConfig(dim=8, epochs=2, batch_size=16, seed=seed, sample=0.0, **changes)
    return train(vocab.encode(TEXT), vocab, config, log_every=5)


def test_tokenize_lowercases_splits_punctuation_and_drops_possessives():
    text = "Alyosha\u2019s “Don't!” said _Ivan_, in 1866; good-bye."
    assert tokenize(text) == ["alyosha", "don't", "said", "ivan", "in", "good", "bye"]


def test_vocabulary_orders_by_count_and_encode_drops_rare_words():
    vocab = Vocabulary.build(["b", "a", "b", "c", "b", "a"], min_count=2)
    assert vocab.words == ["b", "a"] and vocab.counts.tolist() == [3, 2]
    assert vocab.encode(["a", "c", "b"]).tolist() == [1, 0]
    with pytest.raises(ScratchLMError, match="min_count"):
        Vocabulary.build(["a"], min_count=0)
    with pytest.raises(ScratchLMError, match="too small"):
        Vocabulary.build(["a", "b"], min_count=2)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    centre = rng.standard_normal((3, 4))  # (B, D) float64
    targets = rng.standard_normal((3, 6, 4))  # (B, 1+K, D)
    scores, _ = sgns_forward(centre, targets)
    d_centre, d_targets = sgns_backward(centre, targets, scores)
    for array, analytic in ((centre, d_centre), (targets, d_targets)):
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + 1e-6
            plus = sgns_forward(centre, targets)[1].sum()
            array[index] = saved - 1e-6
            minus = sgns_forward(centre, targets)[1].sum()
            array[index] = saved
            numeric[index] = (plus - minus) / 2e-6
        error = np.abs(numeric - analytic) / np.maximum(np.abs(numeric) + np.abs(analytic), 1e-8)
        assert error.max() <= 1e-6


@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=60), st.sampled_from([0.0, 0.75, 1.0]))
@settings(max_examples=60, deadline=None)
def test_alias_table_samples_exactly_the_target_distribution(counts, power):
    target = negative_distribution(np.array(counts), power)
    assert np.allclose(AliasSampler.build(target).probabilities(), target, rtol=0, atol=1e-12)


def test_sampler_frequencies_follow_the_three_quarter_power():
    counts = np.array([1000, 100, 10, 1])
    target = negative_distribution(counts, 0.75)
    assert np.allclose(target, counts**0.75 / (counts**0.75).sum())
    draws = AliasSampler.build(target).sample((200_000,), np.random.default_rng(0))
    observed = np.bincount(draws, minlength=4) / len(draws)
    assert np.all(np.abs(observed - target) < 5 * np.sqrt(target * (1 - target) / len(draws)))


@given(st.lists(st.integers(1, 1_000_000), min_size=2, max_size=50), st.sampled_from([1e-3, 1e-4, 1e-5]))
def test_subsampling_keeps_rare_words_and_thins_frequent_ones(counts, sample):
    counts = np.array(counts)
    keep = keep_probabilities(counts, sample)
    frequency = counts / counts.sum()
    assert np.all((keep > 0) & (keep <= 1))
    assert np.all(keep[frequency <= sample] == 1.0)
    order = np.argsort(frequency)
    assert np.all(np.diff(keep[order]) <= 1e-12)  # more frequent, never more likely kept
    assert np.allclose(keep_probabilities(np.array([1, 99]), 0.01)[1], (np.sqrt(99) + 1) / 99)


def test_dynamic_window_pairs_are_symmetric_and_within_reach():
    ids = np.arange(50, dtype=np.int32)
    centres, contexts = skipgram_pairs(ids, 3, np.random.default_rng(0))
    distance = np.abs(centres - contexts)
    assert distance.min() >= 1 and distance.max() <= 3
    assert np.sum(distance == 1) >= np.sum(distance == 3)  # near words are used at least as often


@given(st.lists(st.integers(0, 5), min_size=1, max_size=40))
def test_scatter_add_accumulates_repeated_rows(rows):
    rows = np.array(rows, dtype=np.int32)
    for width in (3, 4):  # odd: plain float32 path; even: the complex64 view
        updates = np.arange(len(rows) * width, dtype=np.float32).reshape(-1, width) / 7
        expected = np.zeros((6, width), np.float32)
        np.add.at(expected, rows, updates)
        table = np.zeros((6, width), np.float32)
        scatter_add(table, rows, updates)
        assert np.array_equal(table, expected)


def test_batched_step_equals_the_per_pair_loop_for_single_pairs():
    rng = np.random.default_rng(1)
    fast = SkipGram.initialise(20, 6, rng)
    fast.output_vectors[:] = rng.standard_normal((20, 6)).astype(np.float32) * 0.1
    slow = SkipGram(fast.input_vectors.copy(), fast.output_vectors.copy())
    for _ in range(30):
        words = rng.permutation(20)[:5].astype(np.int32)  # centre, context and three distinct negatives
        pair = (words[:1], words[1:2], words[None, 2:5], 0.1)
        assert np.isclose(fast.step(*pair), step_loop(slow, *pair), rtol=1e-5)
    assert np.allclose(fast.input_vectors, slow.input_vectors, atol=1e-6)
    assert np.allclose(fast.output_vectors, slow.output_vectors, atol=1e-6)


def test_training_is_deterministic_given_the_seed_and_the_loss_falls():
    model_a, history_a = small_run(seed=3)
    model_b, history_b = small_run(seed=3)
    model_c, _ = small_run(seed=4)
    assert np.array_equal(model_a.input_vectors, model_b.input_vectors)
    assert history_a["loss"] == history_b["loss"]
    assert not np.array_equal(model_a.input_vectors, model_c.input_vectors)
    assert history_a["loss"][-1] < history_a["loss"][0]


def test_save_and_load_round_trip(tmp_path):
    model, _ = small_run()
    vocab = Vocabulary.build(TEXT, 1)
    config = Word2VecConfig(dim=8)
    save_model(tmp_path / "m.npz", model, vocab, config)
    loaded, loaded_vocab, loaded_config = load_model(tmp_path / "m.npz")
    assert np.array_equal(loaded.input_vectors, model.input_vectors)
    assert loaded_vocab.words == vocab.words and loaded_config == config
    save_arrays(tmp_path / "other.npz", "transformer", {"w": np.zeros(2)})
    with pytest.raises(ScratchLMError, match="transformer"):
        load_model(tmp_path / "other.npz")
    with pytest.raises(ScratchLMError, match="no such file"):
        load_model(tmp_path / "missing.npz")


def test_bad_input_is_a_clear_error():
    with pytest.raises(ScratchLMError, match="dim"):
        Word2VecConfig(dim=0)
    with pytest.raises(ScratchLMError, match="lr"):
        Word2VecConfig(lr=-1.0)
    vectors = WordVectors(["a", "b"], np.eye(2))
    with pytest.raises(ScratchLMError, match="'zebra'"):
        vectors.most_similar("zebra")
    vocab = Vocabulary.build(["a", "b", "a"], 1)
    with pytest.raises(ScratchLMError, match="too few"):
        train(vocab.encode(["a", "b", "a"]), vocab, Word2VecConfig())


def test_cli_errors_are_one_line_with_status_2(tmp_path):
    model, _ = small_run()
    save_model(tmp_path / "m.npz", model, Vocabulary.build(TEXT, 1), Word2VecConfig(dim=8))
    for args in (["similar", "zebra", "--model", str(tmp_path / "m.npz")], ["similar", "cat", "--model", str(tmp_path / "no.npz")]):
        result = subprocess.run([sys.executable, "-m", "scratchlm", "word2vec", *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    result = subprocess.run([sys.executable, "-m", "scratchlm", "word2vec", "similar", "cat", "--k", "2", "--json",
                             "--model", str(tmp_path / "m.npz")], capture_output=True, text=True)
    assert len(json.loads(result.stdout)["neighbours"]) == 2


def test_ranks_average_ties_and_spearman_ignores_scale():
    assert ranks(np.array([10.0, 20.0, 20.0, 30.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 200.0, 3000.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_analogy_accuracy_on_vectors_built_to_solve_it():
    words = ["man", "woman", "king", "queen", "apple"]
    vectors = WordVectors(words, np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1], [0, -1, 0.2]], dtype=float))
    result = evaluate_analogies(vectors, [("family", "man", "woman", "king", "queen"), ("x", "man", "zebra", "a", "b")])
    assert result["accuracy"] == 1.0 and result["questions_used"] == 1
    assert vectors.analogy("man", "woman", "king")[0][0] == "queen"


@pytest.mark.parametrize("record_path", sorted((ROOT / "book" / "_runs").glob("word2vec*.json")), ids=lambda p: p.name)
def test_record_reproduces_its_first_logged_losses(record_path):
    require_data("dostoevsky/brothers_karamazov.txt", "dostoevsky/crime_and_punishment.txt")
    from scratchlm.data import corpus

    record = json.loads(Path(record_path).read_text())
    config = Word2VecConfig(**record["config"])
    tokens = tokenize(corpus(config.corpus))
    vocab = Vocabulary.build(tokens, config.min_count)
    assert len(vocab) == record["metrics"]["vocab_size"]
    log_every = record["curves"]["step"][0]
    _, history = train(vocab.encode(tokens), vocab, config, max_steps=2 * log_every, log_every=log_every)
    assert np.allclose(history["loss"], record["curves"]["loss"][:2], rtol=1e-5)


def test_cli_train_writes_model_and_record_then_similar_reads_it(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text(" ".join(TEXT * 5), encoding="utf-8")
    model, record = tmp_path / "tiny.npz", tmp_path / "tiny.json"
    result = subprocess.run(
        [sys.executable, "-m", "scratchlm", "word2vec", "train", "--corpus", str(text), "--heldout", "none",
         "--dim", "8", "--epochs", "1", "--out", str(model), "--record", str(record), "--json"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["vocab_size"] == len(set(TEXT)) - 1  # "." is not a word
    written = json.loads(record.read_text())
    assert written["config"]["dim"] == 8 and written["curves"]["heldout_loss"] == []
    result = subprocess.run([sys.executable, "-m", "scratchlm", "word2vec", "similar", "cat", "--model", str(model)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == len(set(TEXT)) - 2


def test_cli_bench_reports_both_speeds():
    require_data("dostoevsky/brothers_karamazov.txt")
    result = subprocess.run([sys.executable, "-m", "scratchlm", "word2vec", "bench", "--words", "20000",
                             "--loop-pairs", "50", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["vectorised_words_per_second"] > 0 and report["loop_words_per_second"] > 0
