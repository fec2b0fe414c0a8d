"""Chapter 3: skip-gram with negative sampling, its sampler, its scatter-add, its queries and its records."""

import json
import math
import subprocess
import warnings
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_data
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.embedding_eval import (
    WordVectors,
    evaluate_analogies,
    evaluate_similarity,
    random_pair_cosines,
    ranks,
    read_analogies,
    read_word_pairs,
    spearman,
)
from scratchlm.errors import ScratchLMError
from scratchlm.files import save_arrays
from scratchlm.word2vec import (
    UPDATE_CHUNK,
    AliasSampler,
    FastSkipGram,
    SkipGram,
    Vocabulary,
    Word2VecConfig,
    batches,
    keep_probabilities,
    load_model,
    loss_terms,
    mean_vectors,
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


@pytest.mark.parametrize("model_class", [SkipGram, FastSkipGram])
def test_batched_step_equals_the_per_pair_loop_for_single_pairs(model_class):
    rng = np.random.default_rng(1)
    fast = model_class.initialise(20, 6, rng)
    fast.output_vectors[:] = rng.standard_normal((20, 6)).astype(np.float32) * 0.1
    slow = SkipGram(fast.input_vectors.copy(), fast.output_vectors.copy())
    for _ in range(30):
        words = rng.permutation(20)[:5].astype(np.int32)  # centre, context and three distinct negatives
        pair = (words[:1], words[1:2], words[None, 2:5], 0.1)
        assert np.isclose(fast.step(*pair), step_loop(slow, *pair), rtol=1e-5)
    assert np.allclose(fast.input_vectors, slow.input_vectors, atol=1e-6)
    assert np.allclose(fast.output_vectors, slow.output_vectors, atol=1e-6)


@pytest.mark.parametrize("dim", [6, 7])  # complex64 scatter, and the plain one
def test_fast_step_computes_the_readable_steps_update(dim):
    rng = np.random.default_rng(2)
    readable = SkipGram.initialise(20, dim, rng)
    readable.output_vectors[:] = rng.standard_normal((20, dim)).astype(np.float32)  # large scores too
    fast = FastSkipGram(readable.input_vectors.copy(), readable.output_vectors.copy())
    pairs = 2 * UPDATE_CHUNK + 37  # several chunks, the last one short; every row repeats
    batch = (rng.integers(0, 20, pairs, dtype=np.int32), rng.integers(0, 20, pairs, dtype=np.int32),
             rng.integers(0, 20, (pairs, 5), dtype=np.int32))
    for lr in (0.05, 0.5):
        assert np.isclose(fast.step(*batch, lr), readable.step(*batch, lr), rtol=1e-5)
        for table in ("input_vectors", "output_vectors"):
            assert getattr(fast, table).dtype == np.float32
            assert np.allclose(getattr(fast, table), getattr(readable, table), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize(
    "name, change, wrong",
    [
        ("input_vectors", lambda a: a[:, :5].copy(), "float32[5, 5]"),  # cut to 5 of 8 columns
        ("output_vectors", lambda a: a[:-1].copy(), "float32[4, 8]"),  # a row short
        ("input_vectors", lambda a: a.astype(np.float64), "float64[5, 8]"),
        ("counts", lambda a: a.astype(np.int32), "int32[5]"),
        ("stray", None, "unexpected tensor 'stray'"),
    ],
)
def test_a_file_whose_arrays_disagree_with_its_header_is_refused(tmp_path, name, change, wrong):
    words = ["a", "b", "c", "d", "e"]
    model = SkipGram.initialise(5, 8, np.random.default_rng(0))
    save_model(tmp_path / "m.npz", model, Vocabulary(words, np.arange(5, 0, -1)), Word2VecConfig(dim=8))
    arrays = {"input_vectors": model.input_vectors, "output_vectors": model.output_vectors,
              "counts": np.arange(5, 0, -1)}
    arrays[name] = np.zeros(3) if change is None else change(arrays[name])
    path = tmp_path / "bad.npz"  # the header of a valid file, arrays that disagree with it
    save_arrays(path, "word2vec", arrays, {"words": words, "config": {"dim": 8}})
    with pytest.raises(ScratchLMError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message and repr(name) in message and wrong in message and "\n" not in message
    result = subprocess.run([sys.executable, "-m", "scratchlm", "word2vec", "similar", "a", "--model", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and repr(name) in result.stderr


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


RECORDS = sorted((ROOT / "book" / "_runs").glob("word2vec*.json"))
# a record of `word2vec seeds` holds one run per seed under metrics["runs"]; the others hold one run
SEED_RECORDS = [p for p in RECORDS if "runs" in json.loads(p.read_text())["metrics"]]


@pytest.mark.parametrize("record_path", [p for p in RECORDS if p not in SEED_RECORDS], ids=lambda p: p.name)
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


@pytest.mark.parametrize("record_path", SEED_RECORDS, ids=lambda p: p.name)
def test_seed_record_reproduces_each_seeds_first_logged_loss(record_path):
    """Every seed of a `word2vec seeds` record: the first logged loss again, and the seeds really differ."""
    require_data("dostoevsky/brothers_karamazov.txt", "dostoevsky/crime_and_punishment.txt")
    from scratchlm.data import corpus

    record = json.loads(Path(record_path).read_text())
    base = {k: v for k, v in record["config"].items() if k != "seeds"}
    tokens = tokenize(corpus(base["corpus"]))
    vocab = Vocabulary.build(tokens, base["min_count"])
    assert len(vocab) == record["metrics"]["vocab_size"]
    runs, curves = record["metrics"]["runs"], record["curves"]["runs"]
    assert [r["seed"] for r in runs] == [c["seed"] for c in curves] == record["config"]["seeds"]
    assert len({r["wordsim353"]["spearman"] for r in runs}) == len(runs)  # distinct seeds, distinct models
    ids = vocab.encode(tokens)
    for curve in curves:
        config = Word2VecConfig(**base, seed=curve["seed"])
        log_every = curve["step"][0]
        _, history = train(ids, vocab, config, max_steps=log_every, log_every=log_every)
        assert np.allclose(history["loss"], curve["loss"][:1], rtol=1e-5), curve["seed"]


def test_cli_seeds_records_one_run_per_seed_and_refuses_repeated_seeds(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text(" ".join(TEXT * 5), encoding="utf-8")
    record = tmp_path / "seeds.json"
    command = [sys.executable, "-m", "scratchlm", "word2vec", "seeds", "--corpus", str(text), "--heldout", "none",
               "--dim", "8", "--sample", "0", "--batch-size", "16", "--epochs", "1", "--record", str(record)]
    result = subprocess.run([*command, "--seeds", "3", "4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = json.loads(record.read_text())
    assert written["config"]["seeds"] == [3, 4] and "seed" not in written["config"]
    assert [run["seed"] for run in written["metrics"]["runs"]] == [3, 4]
    assert [c["seed"] for c in written["curves"]["runs"]] == [3, 4]
    assert written["curves"]["runs"][0]["loss"] != written["curves"]["runs"][1]["loss"]
    # the first seed's run is the run `word2vec train --seed 3` makes
    vocab = Vocabulary.build(tokenize(text.read_text()), 5)
    config = Word2VecConfig(corpus=str(text), heldout=None, dim=8, sample=0.0, batch_size=16, epochs=1, seed=3)
    _, history = train(vocab.encode(tokenize(text.read_text())), vocab, config)
    assert history["loss"] and written["curves"]["runs"][0]["loss"] == history["loss"]
    result = subprocess.run([*command, "--seeds", "1", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "[1, 1]" in result.stderr


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


def test_cli_bench_reports_every_speed_against_the_loop_and_records_it(tmp_path):
    require_data("dostoevsky/brothers_karamazov.txt")
    result = subprocess.run([sys.executable, "-m", "scratchlm", "word2vec", "bench", "--words", "20000",
                             "--loop-pairs", "50", "--repeats", "1", "--json", "--record", str(tmp_path / "bench.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["words_per_second"]) == {"per-pair loop", "SkipGram", "FastSkipGram"}
    assert all(rate > 0 for rate in report["words_per_second"].values())
    assert report["times_the_loop"]["per-pair loop"] == 1.0
    assert json.loads((tmp_path / "bench.json").read_text())["metrics"] == report


def test_loss_terms_add_up_to_the_loss_and_the_mean_score_is_the_mean_over_all_pairs():
    rng = np.random.default_rng(5)
    model = SkipGram(rng.standard_normal((7, 4)), rng.standard_normal((7, 4)))  # float64
    centres, contexts, negatives = rng.integers(0, 7, 9), rng.integers(0, 7, 9), rng.integers(0, 7, (9, 3))
    positive, negative = loss_terms(model, centres, contexts, negatives)
    targets = np.concatenate([contexts[:, None], negatives], axis=1)
    _, loss = sgns_forward(model.input_vectors[centres], model.output_vectors[targets])
    assert positive + negative == pytest.approx(loss.mean(), rel=1e-12)
    assert positive == pytest.approx(np.mean(np.log1p(np.exp(-np.einsum(
        "bd,bd->b", model.input_vectors[centres], model.output_vectors[contexts])))), rel=1e-12)
    cosine, score = mean_vectors(model)
    assert score == pytest.approx((model.input_vectors @ model.output_vectors.T).mean(), rel=1e-12)
    mean_in, mean_out = model.input_vectors.mean(0), model.output_vectors.mean(0)
    assert cosine == pytest.approx(mean_in @ mean_out / np.linalg.norm(mean_in) / np.linalg.norm(mean_out))
    one_table = SkipGram(model.input_vectors, model.input_vectors)
    assert mean_vectors(one_table)[0] == pytest.approx(1.0) and mean_vectors(one_table)[1] >= 0
    assert np.isnan(mean_vectors(SkipGram.initialise(7, 4, rng))[0])  # the output table starts at zero


def test_one_table_cannot_lower_the_negatives_term_and_diverges_where_two_tables_train():
    """The chapter's "one table" finding on a smaller problem: two tables make their progress on the negatives,
    with a negative mean score of all pairs; one table keeps the negatives' term at its start, K log 2, and a mean
    score that is never negative; at lr 0.15 one table diverges and two tables do not."""
    require_data("dostoevsky/brothers_karamazov.txt")
    from scratchlm.data import corpus

    tokens = tokenize(corpus("dostoevsky"))[:30_000]
    vocab = Vocabulary.build(tokens, 5)
    ids = vocab.encode(tokens)
    config = Word2VecConfig(min_count=5, dim=16, epochs=1)
    probe = next(batches(ids, config, vocab, np.random.default_rng(123)))[:3]

    def run(tables, lr=0.05):
        start = SkipGram.initialise(len(vocab), config.dim, np.random.default_rng(0))
        model = start if tables == 2 else SkipGram(start.input_vectors, start.input_vectors)
        with np.errstate(over="ignore", invalid="ignore"):
            trained, _ = train(ids, vocab, Word2VecConfig(min_count=5, dim=16, epochs=1, lr=lr), model=model,
                               log_every=20)  # a check for divergence at every log
        return (*loss_terms(trained, *probe), *mean_vectors(trained))

    start_negative = config.negatives * np.log(2)
    positive, negative, cosine, score = run(2)
    assert negative < start_negative - 2.0 and positive > np.log(2)  # all progress on the negatives
    assert cosine < -0.99 and score < -0.5
    positive, negative, cosine, score = run(1)
    assert abs(negative - start_negative) < 0.01 and abs(positive - np.log(2)) < 0.05
    assert cosine == pytest.approx(1.0) and 0 <= score < 1e-3
    run(2, lr=0.15)
    with pytest.raises(ScratchLMError, match="diverged"):
        run(1, lr=0.15)


def test_analogies_are_also_counted_and_scored_per_section():
    words = ["man", "woman", "king", "queen", "apple", "apples"]
    vectors = WordVectors(words, np.array(
        [[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1], [0, -1, 0.2], [0.3, -1, 5]], dtype=float))
    questions = [("family", "man", "woman", "king", "queen"), ("family", "man", "zebra", "a", "b"),
                 ("gram8-plural", "king", "queen", "apple", "apples"), ("gram8-plural", "x", "y", "z", "w")]
    result = evaluate_analogies(vectors, questions)
    assert list(result["sections"]) == ["family", "gram8-plural"]
    assert result["sections"]["family"] == {"questions": 2, "questions_used": 1, "accuracy": 1.0}
    plural = result["sections"]["gram8-plural"]
    assert plural["questions"] == 2 and plural["questions_used"] == 1 and plural["accuracy"] in (0.0, 1.0)
    assert result["semantic_accuracy"] == 1.0 and result["syntactic_accuracy"] == plural["accuracy"]


# ---- asking the vectors questions (embedding_eval) ------------------------------------


def test_word_vectors_are_unit_length_and_a_zero_vector_stays_zero():
    vectors = WordVectors(["a", "b", "c"], np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]]))
    assert vectors.unit.dtype == np.float32
    np.testing.assert_allclose(vectors.unit, [[0.6, 0.8], [0.0, 0.0], [1e-18, 0.0]], rtol=1e-6, atol=0)
    assert vectors.words == ["a", "b", "c"] and vectors.index == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ScratchLMError, match="^3 words but 2 vectors$"):
        WordVectors(["a", "b", "c"], np.eye(2))


def test_a_word_is_looked_up_in_lower_case_and_an_unknown_one_is_named():
    words = [f"w{i}" for i in range(1234)]
    vectors = WordVectors(words, np.eye(1234)[:, :8] + 0.1)
    assert vectors.id("W7") == 7
    with pytest.raises(ScratchLMError, match=r"^'Zebra' is not in the vocabulary of 1,234 words$"):
        vectors.id("Zebra")


def test_similarity_is_the_cosine_of_the_two_words():
    vectors = WordVectors(["a", "b", "c"], np.array([[2.0, 0.0], [1.0, 1.0], [-3.0, 0.0]]))
    assert vectors.similarity("a", "b") == pytest.approx(2**-0.5)
    assert vectors.similarity("a", "c") == pytest.approx(-1.0)
    assert vectors.similarity("B", "b") == pytest.approx(1.0)
    assert isinstance(vectors.similarity("a", "b"), float)


def test_nearest_ranks_by_angle_leaves_out_the_excluded_and_returns_at_most_what_is_left():
    vectors = WordVectors(["a", "b", "c", "d"], np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0], [-1.0, 0.0]]))
    nearest = vectors.nearest(np.array([10.0, 0.0]), 3)
    assert [w for w, _ in nearest] == ["a", "b", "c"]
    assert [s for _, s in nearest] == pytest.approx([1.0, 2**-0.5, 0.0], abs=1e-6)
    assert all(type(s) is float for _, s in nearest)
    assert [w for w, _ in vectors.nearest(np.array([1.0, 0.0]), 10, exclude=(0, 1))] == ["c", "d"]
    assert [w for w, _ in vectors.nearest(np.array([1.0, 0.0]), 10, exclude=(0, 0))] == ["b", "c", "d"]
    assert vectors.nearest(np.array([0.0, 0.0]), 1) == [("a", 0.0)]  # a zero query: no NaN, first row wins ties
    assert [w for w, _ in vectors.nearest(np.array([0.0, 1.0]), 1)] == ["c"]
    for k in (0, -1):
        with pytest.raises(ScratchLMError, match=f"^k must be at least 1, got {k}$"):
            vectors.nearest(np.array([1.0, 0.0]), k)


def test_most_similar_never_returns_the_word_itself_and_analogy_never_a_question_word():
    vectors = WordVectors(["a", "b", "c", "d"], np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]))
    assert [w for w, _ in vectors.most_similar("a")] == ["b", "c", "d"]
    assert [w for w, _ in vectors.most_similar("A", k=1)] == ["b"]
    words = ["man", "woman", "king", "queen", "apple"]
    vectors = WordVectors(words, np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1], [0, -1, 0.2]], float))
    query = vectors.unit[1] - vectors.unit[0] + vectors.unit[2]
    # without the exclusion, woman and king would come right after queen
    assert [w for w, _ in vectors.nearest(query, 3)] == ["queen", "woman", "king"]
    answer = vectors.analogy("Man", "woman", "king", k=2)
    assert [w for w, _ in answer] == ["queen", "apple"]
    assert answer == vectors.nearest(query, 2, exclude=(0, 1, 2))


def test_word_pairs_are_read_lower_cased_skipping_comments_and_blank_lines(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("# Word 1\tWord 2\tHuman\nTiger\tcat\t7.35\n\n   \nold new 1.58 extra\n", encoding="utf-8")
    assert read_word_pairs(path) == [("tiger", "cat", 7.35), ("old", "new", 1.58)]
    for bad, line in (("a\tb\n", 1), ("# c\na b 1\nx y high\n", 3)):
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(ScratchLMError, match=f"^{path}:{line}: expected 'word1 word2 score', got "):
            read_word_pairs(path)
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ScratchLMError, match=f"^{path}: no 'word1 word2 score' lines"):
        read_word_pairs(path)
    with pytest.raises(ScratchLMError, match="no word pairs to evaluate"):
        evaluate_similarity(None, [])


def test_analogy_questions_are_read_by_section_lower_cased(tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text(": capital-common\nAthens Greece Baghdad Iraq\n: gram1-adjective-to-adverb\n"
                    "calm calmly quick quickly\n", encoding="utf-8")
    assert read_analogies(path) == [("capital-common", "athens", "greece", "baghdad", "iraq"),
                                    ("gram1-adjective-to-adverb", "calm", "calmly", "quick", "quickly")]
    path.write_text("a b c d\n: s\na b c\n", encoding="utf-8")
    with pytest.raises(ScratchLMError, match=f"^{path}:3: expected four words, got 'a b c'$"):
        read_analogies(path)
    path.write_text("a b c d\n", encoding="utf-8")
    assert read_analogies(path) == [("", "a", "b", "c", "d")]


def test_similarity_score_is_spearman_on_the_known_pairs_and_counts_the_unknown():
    vectors = WordVectors(["a", "b", "c", "d"], np.array([[1.0, 0.0], [1.0, 0.2], [1.0, 1.0], [0.0, 1.0]]))
    # cosines with a: b 0.98, c 0.71, d 0: the human scores agree in order, though not in scale
    pairs = [("a", "b", 9.0), ("a", "c", 5.0), ("a", "d", 4.9), ("a", "zebra", 10.0)]
    result = evaluate_similarity(vectors, pairs)
    assert result == {"spearman": pytest.approx(1.0), "pairs_used": 3, "pairs": 4, "oov_rate": 0.25}
    reversed_ = evaluate_similarity(vectors, [(a, b, -s) for a, b, s in pairs])
    assert reversed_["spearman"] == pytest.approx(-1.0)
    two = evaluate_similarity(vectors, pairs[:2] + [("zebra", "a", 1.0)])
    assert math.isnan(two["spearman"]) and two["pairs_used"] == 2 and two["oov_rate"] == pytest.approx(1 / 3)


def test_spearman_ranks_ties_by_their_mean_rank():
    assert ranks(np.array([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]
    assert ranks(np.array([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]
    assert ranks(np.array([2.0, 1.0, 2.0, 1.0, 0.0])).tolist() == [4.5, 2.5, 4.5, 2.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_analogies_are_scored_in_blocks_and_a_question_word_is_never_the_answer():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    vectors = WordVectors(words, rng.standard_normal((40, 16)))
    # 1,100 questions span three blocks of 512; each answer is the true 3CosAdd argmax or a wrong word
    questions = []
    for q in range(1100):
        a, b, c = rng.choice(40, size=3, replace=False)
        best = vectors.analogy(words[a], words[b], words[c])[0][0]
        wrong = next(w for w in words if w not in (best, words[a], words[b], words[c]))
        section = "family" if q % 3 else "gram2-opposite"
        questions.append((section, words[a], words[b], words[c], best if q % 2 else wrong))
    result = evaluate_analogies(vectors, questions)
    assert result["questions_used"] == result["questions"] == 1100
    assert result["accuracy"] == pytest.approx(550 / 1100)
    family = [q for q in range(1100) if q % 3]
    assert result["semantic_accuracy"] == pytest.approx(sum(q % 2 for q in family) / len(family))
    # a question whose answer is one of its own words is never right: those words are excluded
    echo = [("s", "w0", "w1", "w2", "w2"), ("s", "w3", "w4", "w5", "w3")]
    assert evaluate_analogies(vectors, echo)["accuracy"] == 0.0


def test_analogies_with_no_known_question_have_no_accuracy():
    vectors = WordVectors(["a", "b"], np.eye(2))
    result = evaluate_analogies(vectors, [("gram1", "a", "b", "x", "y")])
    assert result["questions_used"] == 0 and result["questions"] == 1
    assert all(math.isnan(result[key]) for key in ("accuracy", "semantic_accuracy", "syntactic_accuracy"))
    assert result["sections"]["gram1"]["questions_used"] == 0 and math.isnan(result["sections"]["gram1"]["accuracy"])


def test_random_pairs_are_always_two_different_words():
    vectors = WordVectors(["a", "b"], np.array([[1.0, 0.0], [0.6, 0.8]]))
    cosines = random_pair_cosines(vectors, 50, np.random.default_rng(0))
    assert cosines.shape == (50,) and np.allclose(cosines, 0.6)
    vectors = WordVectors([f"w{i}" for i in range(5)], np.eye(5))  # distinct words are orthogonal
    cosines = random_pair_cosines(vectors, 200, np.random.default_rng(1))
    assert np.all(cosines == 0.0)
    again = random_pair_cosines(WordVectors(["a", "b", "c"], np.random.default_rng(2).standard_normal((3, 4))),
                                100, np.random.default_rng(3))
    assert len(set(np.round(again, 5))) == 3  # every one of the three pairs turns up


def test_nearest_breaks_ties_by_row_and_ignores_the_length_of_the_query():
    # 100 words in two directions: the 50 tied best come back in the order of their rows
    vectors = WordVectors([f"w{i}" for i in range(100)], np.array([[1.0, 0.0], [0.6, 0.8]] * 50))
    nearest = vectors.nearest(np.array([0.1, 0.0]), 10)
    assert [w for w, _ in nearest] == [f"w{i}" for i in range(0, 20, 2)]
    assert [s for _, s in nearest] == pytest.approx([1.0] * 10)  # a short query still scores cosines


def test_most_similar_gives_ten_neighbours_and_analogy_one_answer_by_default():
    vectors = WordVectors([f"w{i}" for i in range(30)], np.random.default_rng(0).standard_normal((30, 5)))
    assert len(vectors.most_similar("w0")) == 10
    assert len(vectors.analogy("w0", "w1", "w2")) == 1


def test_analogy_sections_count_only_their_own_questions():
    words = ["man", "woman", "king", "queen", "apple", "apples"]
    vectors = WordVectors(words, np.array(
        [[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1], [0, -1, 0.2], [0.3, -1, 5]], dtype=float))
    questions = [("family", "man", "woman", "king", "queen")] * 3 + [("family", "zebra", "woman", "king", "queen")]
    questions += [("capitals", "man", "woman", "king", "apple"), ("capitals", "x", "y", "z", "w")]
    result = evaluate_analogies(vectors, questions)
    assert result["questions_used"] == 4 and result["accuracy"] == 0.75
    assert result["sections"] == {
        "family": {"questions": 4, "questions_used": 3, "accuracy": 1.0},
        "capitals": {"questions": 2, "questions_used": 1, "accuracy": 0.0},
    }


def test_no_known_question_gives_nan_without_a_warning():
    vectors = WordVectors(["a", "b"], np.eye(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_analogies(vectors, [("gram1", "a", "b", "x", "y"), ("family", "a", "b", "a", "b")])
    assert math.isnan(result["syntactic_accuracy"]) and result["semantic_accuracy"] == 0.0


def test_a_section_line_needs_no_space_after_the_colon(tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text(":family\nman woman king queen\n", encoding="utf-8")
    assert read_analogies(path) == [("family", "man", "woman", "king", "queen")]


def test_random_pairs_are_uniform_over_the_pairs_of_distinct_words():
    vectors = WordVectors(["a", "b", "c", "d"], np.random.default_rng(0).standard_normal((4, 8)))
    cosines = random_pair_cosines(vectors, 6000, np.random.default_rng(1))
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    counts = [int(np.isclose(cosines, vectors.unit[i] @ vectors.unit[j]).sum()) for i, j in pairs]
    assert sum(counts) == 6000 and all(850 < count < 1150 for count in counts), counts  # 1,000 expected each
