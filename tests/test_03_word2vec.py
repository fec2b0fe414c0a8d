"""Chapter 3: skip-gram with negative sampling, its sampler, its scatter-add, its queries and its records."""

import json
import math
import subprocess
import time
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
    assert np.array_equal(loaded.output_vectors, model.output_vectors)
    assert loaded_vocab.words == vocab.words and loaded_config == config
    assert np.array_equal(loaded_vocab.counts, vocab.counts)
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


# --- the commands, run in this process -------------------------------------------------
# (in this process, so that the mutation tests see which code each test reaches)

from dataclasses import asdict

from conftest import assert_documented

from scratchlm.cli import main
from scratchlm.data import data_path
from scratchlm.word2vec import (
    MAP_WORDS,
    NEIGHBOUR_WORDS,
    SEED_WORDS,
    default_model_path,
    evaluate_vectors,
    heldout_loss,
    prepare_corpus,
)

# every word of the seed's table and some of the neighbour and map words, 40 times each:
# enough for two logged losses with the commands' 200 steps to a log
CRIME_TEXT = (
    "the crime and the punishment . a murder and its guilt . love made the prince happy . "
    "god and money . the general saw the officer and alyosha . "
) * 40
# every option away from its default, so that a value read into the wrong field shows
TINY_OPTIONS = ("--dim", "8", "--epochs", "2", "--batch-size", "16", "--sample", "0", "--window", "2",
                "--negatives", "3", "--lr", "0.1", "--min-count", "5", "--negative-power", "0.5")


def tiny_config(text, heldout, seed):
    return Word2VecConfig(corpus=str(text), heldout=heldout and str(heldout), dim=8, epochs=2, batch_size=16,
                          sample=0.0, window=2, negatives=3, lr=0.1, min_count=5, negative_power=0.5, seed=seed)


@pytest.fixture
def crime_corpus(tmp_path):
    text, heldout = tmp_path / "crime.txt", tmp_path / "heldout.txt"
    text.write_text(CRIME_TEXT, encoding="utf-8")
    heldout.write_text("the prince saw the crime and the money . " * 20, encoding="utf-8")
    return text, heldout


def run_word2vec(capsys, *argv):
    code = main(["word2vec", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def as_json(value):
    """What a value becomes once written to a JSON record and read back."""
    return json.loads(json.dumps(value))


def test_every_word2vec_command_and_option_has_help():
    assert_documented("word2vec")


def test_train_command_saves_and_records_the_run_that_train_makes(capsys, crime_corpus, tmp_path):
    require_data("eval/wordsim353.tsv", "eval/simlex999.txt", "eval/questions-words.txt")
    text, heldout = crime_corpus
    out, record = tmp_path / "m.npz", tmp_path / "r.json"
    code, stdout, stderr = run_word2vec(capsys, "train", "--corpus", text, "--heldout", heldout, *TINY_OPTIONS,
                                        "--seed", 7, "--out", out, "--record", record, "--json")
    assert code == 0 and stderr == ""
    config = tiny_config(text, heldout, 7)
    tokens, vocab, ids, heldout_ids = prepare_corpus(config)
    assert len(tokens) == len(tokenize(CRIME_TEXT)) and heldout_ids is not None
    model, history = train(ids, vocab, config, heldout_ids=heldout_ids)
    saved, saved_vocab, saved_config = load_model(out)
    assert saved_config == config and saved_vocab.words == vocab.words
    assert np.array_equal(saved.input_vectors, model.input_vectors)
    assert np.array_equal(saved.output_vectors, model.output_vectors)
    metrics, embedding_map = evaluate_vectors(WordVectors(vocab.words, model.input_vectors), 7)
    written = json.loads(record.read_text())
    assert written["config"] == asdict(config)
    for key, value in metrics.items():
        np.testing.assert_equal(written["metrics"][key], as_json(value), err_msg=key)
    assert {key: written["metrics"][key] for key in ("corpus_words", "training_words", "vocab_size", "final_loss")} \
        == {"corpus_words": len(tokens), "training_words": len(ids), "vocab_size": len(vocab),
            "final_loss": history["loss"][-1]}
    assert written["metrics"]["words_per_second"] > 0 and written["metrics"]["train_seconds"] > 0
    assert written["elapsed_seconds"] == pytest.approx(written["metrics"]["train_seconds"], abs=5e-4)  # rounded
    keys = ("step", "words", "loss", "lr", "heldout_epoch", "heldout_loss")
    assert written["curves"] == as_json({key: history[key] for key in keys})
    assert len(written["curves"]["heldout_loss"]) == config.epochs + 1
    assert written["samples"] == [as_json(embedding_map)]
    summary = json.loads(stdout)
    assert (summary["model"], summary["record"], summary["vocab_size"]) == (str(out), str(record), len(vocab))
    np.testing.assert_equal(
        [summary["wordsim353"], summary["simlex999"], summary["analogies"]],
        [metrics["wordsim353"]["spearman"], metrics["simlex999"]["spearman"], metrics["analogies"]["accuracy"]])


def test_train_command_shows_progress_and_saves_to_the_user_cache_by_default(capsys, crime_corpus, tmp_path,
                                                                           monkeypatch):
    require_data("eval/wordsim353.tsv", "eval/simlex999.txt", "eval/questions-words.txt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text, _ = crime_corpus
    code, stdout, stderr = run_word2vec(capsys, "train", "--corpus", text, "--heldout", "None", *TINY_OPTIONS)
    assert code == 0
    path = tmp_path / "cache" / "scratchlm" / "word2vec-crime.npz"
    assert default_model_path(str(text)) == path and path.is_file()
    assert load_model(path)[2] == tiny_config(text, None, 0)
    _, vocab, ids, _ = prepare_corpus(tiny_config(text, None, 0))
    _, history = train(ids, vocab, tiny_config(text, None, 0))
    last = f"\r{history['words'][-1] / (2 * len(tokenize(CRIME_TEXT))):6.1%}  step {history['step'][-1]:,}  loss "
    assert stderr.endswith(last + f"{history['loss'][-1]:.4f}")
    assert stderr.count("\r") == len(history["step"])
    lines = stdout.splitlines()
    assert lines[0] == "" and lines[1] == f"model: {path}" and lines[2] == "record: None"
    assert lines[5] == f"vocab_size: {len(load_model(path)[1])}" and len(lines) == 9


def test_seeds_command_records_what_each_seeds_train_run_measures(capsys, crime_corpus, tmp_path):
    require_data("eval/wordsim353.tsv", "eval/simlex999.txt", "eval/questions-words.txt")
    text, heldout = crime_corpus
    record = tmp_path / "seeds.json"
    code, stdout, stderr = run_word2vec(capsys, "seeds", "--corpus", text, "--heldout", heldout, *TINY_OPTIONS,
                                        "--seeds", 4, 3, "--record", record)
    assert code == 0 and json.loads(stdout) == {"record": str(record), "seeds": [4, 3]}
    written = json.loads(record.read_text())
    tokens, vocab, ids, heldout_ids = prepare_corpus(tiny_config(text, heldout, 4))
    assert written["config"] == {**{k: v for k, v in asdict(tiny_config(text, heldout, 4)).items() if k != "seed"},
                                 "seeds": [4, 3]}
    assert written["metrics"]["corpus_words"] == len(tokens) and written["metrics"]["training_words"] == len(ids)
    assert written["metrics"]["vocab_size"] == len(vocab)
    seconds = 0.0
    for seed, run, curve, line in zip([4, 3], written["metrics"]["runs"], written["curves"]["runs"],
                                      stderr.splitlines(), strict=True):
        model, history = train(ids, vocab, tiny_config(text, heldout, seed), heldout_ids=heldout_ids)
        metrics, _ = evaluate_vectors(WordVectors(vocab.words, model.input_vectors), seed)
        expected = {"seed": seed, **{k: metrics[k] for k in ("wordsim353", "simlex999", "analogies")},
                    "random_cosine_mean": metrics["random_cosine"]["mean"], "seed_table": metrics["seed_table"],
                    "final_loss": history["loss"][-1]}
        np.testing.assert_equal({k: run[k] for k in expected}, as_json(expected))
        assert run["train_seconds"] > 0
        seconds += run["train_seconds"]
        keys = ("step", "words", "loss", "lr", "heldout_epoch", "heldout_loss")
        assert curve == as_json({"seed": seed, **{key: history[key] for key in keys}})
        assert line.startswith(f"seed {seed}: WordSim-353 ") and " SimLex-999 " in line and " analogies " in line
    assert written["elapsed_seconds"] == pytest.approx(seconds, abs=5e-4)  # rounded
    code, _, stderr = run_word2vec(capsys, "seeds", "--corpus", text, "--seeds", 1, 1, "--record", record)
    assert code == 2 and stderr == "error: --seeds needs distinct seeds, got [1, 1]\n"


def tiny_vectors_model(tmp_path, n_words=12):
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(n_words)]
    model = SkipGram(rng.standard_normal((n_words, 4)).astype(np.float32), np.zeros((n_words, 4), np.float32))
    path = tmp_path / "vectors.npz"
    save_model(path, model, Vocabulary(words, np.arange(n_words, 0, -1)), Word2VecConfig(dim=4))
    return path, WordVectors(words, model.input_vectors)


def test_similar_command_prints_the_saved_models_nearest_words(capsys, tmp_path, monkeypatch):
    path, vectors = tiny_vectors_model(tmp_path)
    expected = vectors.most_similar("w3", 4)
    code, out, err = run_word2vec(capsys, "similar", "w3", "--k", 4, "--model", path)
    assert code == 0 and err == "" and out == "".join(f"{w:20s} {c:.3f}\n" for w, c in expected)
    code, out, _ = run_word2vec(capsys, "similar", "w3", "--k", 4, "--model", path, "--json")
    assert json.loads(out) == {"word": "w3", "neighbours": as_json(expected)}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default_model_path("dostoevsky").parent.mkdir(parents=True)
    default_model_path("dostoevsky").write_bytes(path.read_bytes())
    code, out, _ = run_word2vec(capsys, "similar", "w3")  # the default model and ten neighbours
    assert code == 0 and out == "".join(f"{w:20s} {c:.3f}\n" for w, c in vectors.most_similar("w3", 10))
    code, _, err = run_word2vec(capsys, "similar", "zebra", "--model", path)
    assert code == 2 and err.count("\n") == 1 and "'zebra'" in err


def test_bench_command_times_the_three_trainers_on_the_words_asked_for(capsys, tmp_path):
    require_data("dostoevsky/brothers_karamazov.txt")
    record = tmp_path / "bench.json"
    code, out, err = run_word2vec(capsys, "bench", "--words", 20000, "--loop-pairs", 40, "--repeats", 2,
                                  "--seed", 3, "--record", record)
    assert code == 0 and err == ""
    written = json.loads(record.read_text())
    metrics = written["metrics"]
    assert metrics["words"] == 20000
    # every repeat of both trainers counts: at least twice the time of their fastest runs
    from scratchlm.data import corpus

    tokens = tokenize(corpus("dostoevsky"))[:20000]
    n_ids = len(Vocabulary.build(tokens, 5).encode(tokens))
    rates = metrics["words_per_second"]
    assert written["elapsed_seconds"] >= 2 * (n_ids / rates["SkipGram"] + n_ids / rates["FastSkipGram"]) - 1e-3
    assert written["config"] == {**asdict(Word2VecConfig(epochs=1, seed=3)), "words": 20000, "loop_pairs": 40,
                                 "repeats": 2}
    rates = metrics["words_per_second"]
    assert list(rates) == ["per-pair loop", "SkipGram", "FastSkipGram"] and all(r > 0 for r in rates.values())
    assert metrics["times_the_loop"] == {name: rate / rates["per-pair loop"] for name, rate in rates.items()}
    assert out.splitlines() == [f"{name:14s} {rate:>10,.0f} words/s  x{rate / rates['per-pair loop']:,.1f} the "
                                "per-pair loop" for name, rate in rates.items()]
    # the loop runs at most one batch
    code, out, _ = run_word2vec(capsys, "bench", "--words", 5000, "--loop-pairs", 10**6, "--repeats", 1,
                                "--record", record, "--json")
    assert code == 0 and json.loads(record.read_text())["config"]["loop_pairs"] == Word2VecConfig().batch_size
    assert json.loads(out) == json.loads(record.read_text())["metrics"]
    code, out, err = run_word2vec(capsys, "bench", "--repeats", 0)
    assert code == 2 and out == "" and err == "error: --repeats must be at least 1, got 0\n"


def test_evaluate_vectors_scores_the_benchmarks_and_sets_the_seed_table_against_random_pairs():
    data = require_data("eval/wordsim353.tsv", "eval/simlex999.txt", "eval/questions-words.txt")
    words = ["crime", *SEED_WORDS, *NEIGHBOUR_WORDS[2:], "tiger", "cat", "king", "queen", "man", "woman", "sonia"]
    rng = np.random.default_rng(0)
    words = list(dict.fromkeys(words))
    vectors = WordVectors(words, rng.standard_normal((len(words), 6)))
    metrics, embedding_map = evaluate_vectors(vectors, seed=3)
    np.testing.assert_equal(metrics["wordsim353"],
                            evaluate_similarity(vectors, read_word_pairs(data / "eval/wordsim353.tsv")))
    np.testing.assert_equal(metrics["simlex999"],
                            evaluate_similarity(vectors, read_word_pairs(data / "eval/simlex999.txt")))
    np.testing.assert_equal(metrics["analogies"],
                            evaluate_analogies(vectors, read_analogies(data / "eval/questions-words.txt")))
    assert metrics["wordsim353"]["pairs_used"] > 2 and metrics["analogies"]["questions_used"] > 0
    background = random_pair_cosines(vectors, 100_000, np.random.default_rng(3))
    histogram, edges = np.histogram(background, bins=80, range=(-1.0, 1.0))
    assert metrics["random_cosine"] == {"mean": float(background.mean()), "histogram": histogram.tolist(),
                                        "edges": edges.tolist()}
    assert metrics["seed_table"] == [
        {"word": w, "cosine": vectors.similarity("crime", w),
         "percentile": float(100.0 * np.mean(background < vectors.similarity("crime", w)))}
        for w in SEED_WORDS]
    assert metrics["neighbours"] == {w: vectors.most_similar(w, 10) for w in NEIGHBOUR_WORDS}
    on_map = [w for w in MAP_WORDS if w in vectors.index]
    assert embedding_map["words"] == on_map and "sonia" in on_map and "tiger" not in on_map
    assert np.array_equal(embedding_map["vectors"], np.round(vectors.unit[[vectors.index[w] for w in on_map]], 4))
    without_crime = WordVectors(vectors.words[1:], vectors.unit[1:])
    assert evaluate_vectors(without_crime, seed=3)[0]["seed_table"] == []


def test_heldout_loss_is_the_mean_pair_loss_on_the_same_pairs_every_call():
    ids = np.tile(Vocabulary.build(TEXT, 1).encode(TEXT), 12)  # ~ 28,000 pairs: more than one chunk
    vocab = Vocabulary.build(TEXT, 1)
    config = Word2VecConfig(dim=8, negatives=3)
    untrained = SkipGram.initialise(len(vocab), 8, np.random.default_rng(0))  # every score is 0
    for pairs in (50_000, 9000, 7):
        assert heldout_loss(untrained, ids, config, vocab, pairs=pairs) == pytest.approx(4 * math.log(2))
    model, _ = small_run()
    first = heldout_loss(model, ids, config, vocab)
    assert heldout_loss(model, ids, config, vocab) == first
    assert heldout_loss(model, ids, config, vocab, pairs=9000) != first
    model.output_vectors[0] += 1.0  # moves the score of every pair with target 0
    assert heldout_loss(model, ids, config, vocab) != first


def test_the_per_pair_loop_returns_the_mean_loss_per_pair():
    # output vectors start at 0, and no pair meets a row an earlier pair changed: every score is 0
    model = SkipGram.initialise(12, 4, np.random.default_rng(0))
    centres, contexts = np.array([0, 4, 8], np.int32), np.array([1, 5, 9], np.int32)
    loss = step_loop(model, centres, contexts, np.array([[2, 3], [6, 7], [10, 11]], np.int32), 0.1)
    assert loss == pytest.approx(3 * math.log(2))


def test_batches_cover_each_epoch_once_in_batches_no_larger_than_asked():
    vocab = Vocabulary.build(TEXT, 1)
    ids = np.tile(vocab.encode(TEXT), 150)  # 58,500 words: two chunks
    config = Word2VecConfig(batch_size=100, epochs=2, sample=0.0, window=2, negatives=3)
    stream = list(batches(ids, config, vocab, np.random.default_rng(0)))
    words = [w for *_, w in stream]
    assert all(type(w) is int for w in words) and sum(words) == 2 * len(ids)
    sizes = [len(centres) for centres, *_ in stream]
    assert min(sizes) > 0 and max(sizes) == 100
    # a chunk with fewer pairs than a batch is one batch, not one and an empty one
    whole = Word2VecConfig(batch_size=10**6, epochs=1, sample=0.0)
    assert [len(c) for c, *_ in batches(ids[:1000], whole, vocab, np.random.default_rng(0))] != [0]
    assert len(list(batches(ids[:1000], whole, vocab, np.random.default_rng(0)))) == 1
    # pairs at distance 1 and 2 of each chunk of the corpus: each word is a centre once per context it has
    centres = np.concatenate([c for c, *_ in stream])
    assert len(centres) == sum(sizes) and 2 * len(ids) * 2 <= len(centres) <= 2 * len(ids) * 4
    first_word_as_centre = np.concatenate([c[x == ids[1]] for c, x, *_ in stream])
    assert len(first_word_as_centre) > 0


def test_batches_draw_negatives_with_the_configured_power():
    vocab = Vocabulary(["a", "b", "c", "d"], np.array([1000, 100, 10, 1]))
    ids = np.tile(np.arange(4, dtype=np.int32), 2000)
    for power in (0.0, 1.0):
        config = Word2VecConfig(sample=0.0, negative_power=power, epochs=1)
        negatives = np.concatenate([n.ravel() for _, _, n, _ in batches(ids, config, vocab, np.random.default_rng(0))])
        share = np.bincount(negatives, minlength=4) / len(negatives)
        assert np.allclose(share, negative_distribution(vocab.counts, power), atol=0.01), power


def test_a_word2vec_file_without_its_words_is_refused_by_name(tmp_path):
    model, _ = small_run()
    arrays = {"input_vectors": model.input_vectors, "output_vectors": model.output_vectors,
              "counts": Vocabulary.build(TEXT, 1).counts}
    save_arrays(tmp_path / "m.npz", "word2vec", arrays, {"config": asdict(Word2VecConfig(dim=8))})
    with pytest.raises(ScratchLMError, match=r"m\.npz is an incomplete word2vec file"):
        load_model(tmp_path / "m.npz")



def test_command_defaults_are_the_configs_and_the_ones_their_help_states():
    from scratchlm.cli import build_parser

    parse = build_parser().parse_args
    train_args = parse(["word2vec", "train"])
    assert {name: getattr(train_args, name) for name in asdict(Word2VecConfig())} == asdict(Word2VecConfig())
    assert (train_args.out, train_args.record, train_args.json) == (None, None, False)
    assert parse(["word2vec", "train", "--heldout", "NONE", "--sample", "0.5"]).heldout is None
    assert parse(["word2vec", "train", "--heldout", "the-idiot"]).heldout == "the-idiot"
    seeds_args = parse(["word2vec", "seeds", "--record", "r.json"])
    assert seeds_args.seeds == [0, 1, 2] and not hasattr(seeds_args, "seed")
    bench_args = parse(["word2vec", "bench"])
    assert (bench_args.words, bench_args.loop_pairs, bench_args.repeats, bench_args.seed) == (300_000, 2_000, 3, 0)
    similar_args = parse(["word2vec", "similar", "crime"])
    assert (similar_args.word, similar_args.k, similar_args.model, similar_args.json) == ("crime", 10, None, False)
    for command in (["word2vec"], ["word2vec", "seeds"]):  # a command, and the record, are required
        with pytest.raises(SystemExit):
            parse(command)
    for args in (["train"], ["seeds", "--record", "r.json"], ["similar", "x"], ["bench"]):
        assert parse(["word2vec", *args]).run.__name__ == f"_{args[0]}_command"


def test_dynamic_window_uses_a_neighbour_at_distance_d_with_probability_falling_in_d():
    ids = np.arange(30_000, dtype=np.int32)  # distinct ids: a pair's distance is |centre - context|
    for window in (2, 3):
        centres, contexts = skipgram_pairs(ids, window, np.random.default_rng(0))
        counts = np.bincount(np.abs(centres - contexts))
        assert len(counts) == window + 1 and counts[0] == 0
        for d in range(1, window + 1):  # both sides of each of the N - d centres that have one
            expected = 2 * (len(ids) - d) * (window - d + 1) / window
            assert counts[d] == pytest.approx(expected, rel=0.02), (window, d)


def test_heldout_loss_draws_negatives_with_the_configured_power():
    # one word scores 8 against every centre, all others 0: the loss counts how often it is drawn
    vocab = Vocabulary(["a", "b", "c", "d"], np.array([1000, 100, 10, 1]))
    ids = np.tile(np.array([1, 2, 3, 2, 1, 3], np.int32), 5000)  # "a" is never a true context
    model = SkipGram(np.ones((4, 2), np.float32), np.zeros((4, 2), np.float32))
    model.output_vectors[0] = 4.0
    softplus = math.log1p(math.exp(8.0))
    for power in (0.0, 1.0):
        config = Word2VecConfig(negative_power=power, negatives=5)
        drawn = negative_distribution(vocab.counts, power)[0]
        expected = math.log(2) + 5 * ((1 - drawn) * math.log(2) + drawn * softplus)
        assert heldout_loss(model, ids, config, vocab) == pytest.approx(expected, rel=0.01), power


def test_a_run_too_short_to_log_records_no_final_loss(capsys, tmp_path, monkeypatch):
    require_data("eval/wordsim353.tsv", "eval/simlex999.txt", "eval/questions-words.txt")
    text = tmp_path / "short.txt"
    text.write_text(CRIME_TEXT[: len(CRIME_TEXT) // 20], encoding="utf-8")
    argv = ["word2vec", "train", "--corpus", str(text), "--heldout", "none", "--dim", "4", "--epochs", "1",
            "--min-count", "1", "--out", str(tmp_path / "m.npz"), "--record", str(tmp_path / "r.json"), "--json"]
    monkeypatch.setattr(sys, "argv", ["scratchlm", *argv])
    assert main(argv) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["metrics"]["final_loss"] is None and written["curves"]["loss"] == []
    assert written["command"] == "python -m scratchlm " + " ".join(argv)
    # with the default --min-count 5 and sub-sampling, this text leaves chunks with no pairs
    argv = ["word2vec", "seeds", *argv[2:10], "--seeds", "1", "--record", str(tmp_path / "s.json")]
    monkeypatch.setattr(sys, "argv", ["scratchlm", *argv])
    assert main(argv) == 0
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["metrics"]["runs"][0]["final_loss"] is None
    assert written["command"] == "python -m scratchlm " + " ".join(argv)
    capsys.readouterr()


def test_bench_command_accounts_for_every_second_it_timed(capsys, tmp_path, monkeypatch):
    require_data("dostoevsky/brothers_karamazov.txt")
    argv = ["word2vec", "bench", "--words", "20000", "--loop-pairs", "600", "--repeats", "1", "--seed", "2",
            "--record", str(tmp_path / "bench.json"), "--json"]
    monkeypatch.setattr(sys, "argv", ["scratchlm", *argv])
    started = time.perf_counter()
    assert main(argv) == 0
    wall = time.perf_counter() - started
    capsys.readouterr()
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["command"] == "python -m scratchlm " + " ".join(argv)
    rates = written["metrics"]["words_per_second"]
    config = Word2VecConfig(epochs=1, seed=2)
    from scratchlm.data import corpus

    tokens = tokenize(corpus("dostoevsky"))[:20000]
    vocab = Vocabulary.build(tokens, config.min_count)
    ids = vocab.encode(tokens)
    centres, _, _, words = next(batches(ids, config, vocab, np.random.default_rng(2)))
    training_seconds = len(ids) / rates["SkipGram"] + len(ids) / rates["FastSkipGram"]
    loop_seconds = written["elapsed_seconds"] - training_seconds  # the record keeps 1 ms
    assert 0 < loop_seconds and written["elapsed_seconds"] <= wall
    assert rates["per-pair loop"] == pytest.approx(words * 600 / len(centres) / loop_seconds, rel=0.05)


def test_a_chunk_sub_sampled_to_no_pairs_takes_no_step_but_its_words_count():
    vocab = Vocabulary.build(TEXT, 1)
    ids = vocab.encode(TEXT)  # one chunk, every word common enough to be dropped nearly always
    config = Word2VecConfig(dim=4, epochs=3, sample=1e-7)
    before = FastSkipGram.initialise(len(vocab), 4, np.random.default_rng(0))
    model, history = train(ids, vocab, config, heldout_ids=ids, log_every=1)
    assert history["step"] == [] and len(history["heldout_loss"]) == 4  # after each epoch
    assert history["words_per_second"] == pytest.approx(3 * len(ids) / history["seconds"])
    assert np.array_equal(model.input_vectors, before.input_vectors)


def test_train_logs_every_200_steps_by_default_and_stops_at_max_steps():
    vocab = Vocabulary.build(TEXT, 1)
    ids = np.tile(vocab.encode(TEXT), 6)
    config = Word2VecConfig(dim=4, epochs=3, batch_size=16, sample=0.0, lr=0.05)
    seen = []
    model, history = train(ids, vocab, config, heldout_ids=ids, on_log=lambda h, m: seen.append((len(h["step"]), m)))
    steps = history["step"]
    assert steps == list(range(200, steps[-1] + 1, 200)) and len(steps) >= 2
    assert seen == [(i + 1, model) for i in range(len(steps))]  # after each log, with the model
    assert history["heldout_epoch"] == [0.0, 1.0, 2.0, 3.0]
    assert history["heldout_loss"][0] == pytest.approx(6 * math.log(2))  # output vectors start at 0
    assert all(math.isfinite(loss) for loss in history["heldout_loss"])
    # the rate decays linearly in the words done, from config.lr towards 0
    lr, words = np.array(history["lr"]), np.array(history["words"])
    assert np.all(np.diff(lr) < 0) and 0 < lr[-1] < lr[0] < config.lr
    assert np.allclose(1 - lr / config.lr, (words - words[0]) / (3 * len(ids)) + 1 - lr[0] / config.lr, atol=0.01)
    _, short = train(ids, vocab, config, max_steps=3, log_every=1)
    assert short["step"] == [1, 2, 3]


def test_train_needs_one_whole_window_of_words():
    vocab = Vocabulary(["a", "b"], np.array([5, 5]))
    config = Word2VecConfig(dim=4, window=3, epochs=1, sample=0.0)
    train(np.array([0, 1] * 3 + [0], np.int32), vocab, config)  # 2 * 3 + 1 words: enough
    with pytest.raises(ScratchLMError, match="6 in-vocabulary words are too few for a window of 3"):
        train(np.array([0, 1] * 3, np.int32), vocab, config)


def test_vocabulary_breaks_ties_alphabetically_and_encodes_to_int32():
    vocab = Vocabulary.build(["b", "c", "a", "c", "b", "a", "d"], 1)
    assert vocab.words == ["a", "b", "c", "d"] and vocab.counts.dtype == np.int64
    assert vocab.encode(["d", "a"]).dtype == np.int32


def test_negatives_default_to_the_three_quarter_power_and_configs_refuse_edge_values():
    counts = np.array([81, 16, 1])
    assert np.allclose(negative_distribution(counts), negative_distribution(counts, 0.75))
    for field, value in (("lr", 0.0), ("sample", 1.0), ("sample", 1.5), ("sample", -0.1)):
        with pytest.raises(ScratchLMError, match=f"{field} must be"):
            Word2VecConfig(**{field: value})


def test_scatter_add_is_exact_on_float64_tables_of_even_width():
    table = np.zeros((3, 4))
    scatter_add(table, np.array([1, 1, 2]), np.arange(12, dtype=np.float64).reshape(3, 4))
    assert np.array_equal(table, [[0, 0, 0, 0], [4, 6, 8, 10], [8, 9, 10, 11]])
