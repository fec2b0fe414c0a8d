"""Chapter 4: the layer convention, softmax, attention and the tiny attention model."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_documented, require_data
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.attention import (
    CausalSelfAttention,
    TinyAttentionLM,
    attention_backward,
    attention_flops,
    attention_forward,
    benchmark,
    causal_mask,
    gradient_descent,
    held_out_nll,
    masked_softmax,
    random_windows,
)
from scratchlm.errors import ScratchLMError
from scratchlm.gradcheck import check_gradients, check_layer, numerical_gradient
from scratchlm.layers import Embedding, Linear, log_softmax, softmax, softmax_backward, softmax_cross_entropy
from scratchlm.runs import read_record

TOLERANCE = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_all_below(errors):
    assert errors, "nothing was checked"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"


# --- softmax -------------------------------------------------------------------------------------


def test_softmax_backward_matches_finite_differences():
    r = rng()
    scores, weights = r.standard_normal((3, 4, 7)), r.standard_normal((3, 4, 7))
    probs = softmax(scores)
    analytic = softmax_backward(probs, weights)
    assert_all_below(check_gradients(lambda: float((weights * softmax(scores)).sum()), {"scores": scores}, {"scores": analytic}))


def test_softmax_and_log_softmax_survive_huge_scores():
    scores = np.array([[1000.0, 999.0, -1000.0], [-1e4, 0.0, 1e4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs, log_probs = softmax(scores), log_softmax(scores)
    assert np.isfinite(probs).all() and np.isfinite(log_probs[:, :2]).all()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0)
    np.testing.assert_allclose(np.exp(log_probs), probs, atol=1e-300)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=12),
    allowed=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_masked_softmax_is_a_distribution_over_allowed_keys_or_all_zero(scores, allowed):
    scores = np.array(scores)
    mask = np.array(allowed[: len(scores)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = masked_softmax(scores, mask)
    assert np.isfinite(probs).all()
    assert (probs[~mask] == 0).all()
    assert probs.sum() == pytest.approx(1.0 if mask.any() else 0.0)


def test_fully_masked_row_gives_zeros_and_zero_gradients_not_nan():
    r = rng(1)
    q, k, v = (r.standard_normal((2, 4, 3)) for _ in range(3))
    mask = causal_mask(4).copy()
    mask[2] = False  # query 2 may look at nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, probs = attention_forward(q, k, v, mask)
        grads = attention_backward(np.ones_like(out), q, k, v, probs)
    assert (out[:, 2] == 0).all() and (probs[:, 2] == 0).all()
    assert all(np.isfinite(g).all() for g in grads)


def test_masked_attention_backward_matches_finite_differences():
    r = rng(2)
    q, k, v = r.standard_normal((2, 5, 3)), r.standard_normal((2, 6, 3)), r.standard_normal((2, 6, 3))
    mask = r.random((5, 6)) < 0.6
    mask[1] = False  # include a fully masked row
    weights = r.standard_normal((2, 5, 3))
    out, probs = attention_forward(q, k, v, mask)
    dq, dk, dv = attention_backward(weights, q, k, v, probs)

    def loss():
        return float((weights * attention_forward(q, k, v, mask)[0]).sum())

    assert_all_below(check_gradients(loss, {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}))


# --- layers and the checker ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda r: Linear(4, 3, rng=r, dtype=np.float64), lambda r: r.standard_normal((2, 3, 4))),
        (lambda r: Embedding(5, 3, rng=r, dtype=np.float64), lambda r: np.array([[0, 4, 4], [2, 0, 1]])),
        (lambda r: CausalSelfAttention(8, 2, rng=r, dtype=np.float64), lambda r: r.standard_normal((2, 5, 8))),
        (lambda r: CausalSelfAttention(6, 3, rng=r, dtype=np.float64), lambda r: r.standard_normal((1, 1, 6))),
        (lambda r: TinyAttentionLM(7, 6, 8, 2, rng=r, dtype=np.float64), lambda r: r.integers(0, 7, (2, 6))),
    ],
    ids=["linear", "embedding", "attention", "attention-one-token", "tiny-model"],
)
def test_layer_gradients_match_finite_differences(make, x):
    r = rng(3)
    layer = make(r)
    errors = check_layer(layer, x(r), r)
    assert set(layer.params) <= set(errors)
    assert_all_below(errors)


def test_softmax_cross_entropy_gradient_and_value():
    r = rng(4)
    logits, targets = r.standard_normal((3, 4, 6)), r.integers(0, 6, (3, 4))
    loss, dlogits = softmax_cross_entropy(logits, targets)
    expected = -np.mean(np.log(softmax(logits))[np.arange(3)[:, None], np.arange(4), targets])
    assert loss == pytest.approx(expected)
    assert_all_below(check_gradients(lambda: softmax_cross_entropy(logits, targets)[0], {"logits": logits}, {"logits": dlogits}))


def test_checker_catches_a_wrong_backward():
    class Doubled(Linear):
        def backward(self, dy):
            return 2 * super().backward(dy)

    r = rng(5)
    errors = check_layer(Doubled(3, 2, rng=r, dtype=np.float64), r.standard_normal((4, 3)), r)
    assert errors["input"] > 0.1 and errors["weight"] <= TOLERANCE


def test_checker_refuses_float32():
    with pytest.raises(ScratchLMError, match="float64"):
        numerical_gradient(lambda: 0.0, np.zeros(3, dtype=np.float32))


def test_backward_accumulates_and_parents_share_the_arrays():
    r = rng(6)
    layer = CausalSelfAttention(4, 2, rng=r, dtype=np.float64)
    x, dy = r.standard_normal((2, 3, 4)), r.standard_normal((2, 3, 4))
    layer.forward(x)
    layer.backward(dy)
    once = {name: grad.copy() for name, grad in layer.grads.items()}
    layer.forward(x)
    layer.backward(dy)
    for name, grad in layer.grads.items():
        np.testing.assert_allclose(grad, 2 * once[name])
    assert layer.params["qkv.weight"] is layer.qkv.params["weight"]
    assert layer.grads["proj.bias"] is layer.proj.grads["bias"]
    layer.zero_grads()
    assert all((grad == 0).all() for grad in layer.qkv.grads.values())


# --- multi-head attention: causality, batches, shapes --------------------------------------------


def later_change_moves_earlier_output(layer, n_tokens, changed, seed=7):
    """Change the input at position ``changed``: does any output before it move, even by one bit?"""
    r = rng(seed)
    x = r.standard_normal((2, n_tokens, layer.d_model))
    before = layer.forward(x)
    x[:, changed] += r.standard_normal(layer.d_model)
    after = layer.forward(x)
    assert not np.allclose(after[:, changed], before[:, changed])  # the change itself is seen
    return not np.array_equal(after[:, :changed], before[:, :changed])


@settings(max_examples=25, deadline=None)
@given(n_tokens=st.integers(2, 9), changed=st.integers(0, 8), n_head=st.sampled_from([1, 2, 4]))
def test_changing_a_later_token_never_changes_an_earlier_output(n_tokens, changed, n_head):
    layer = CausalSelfAttention(8, n_head, rng=rng(7), dtype=np.float64)
    assert not later_change_moves_earlier_output(layer, n_tokens, changed % n_tokens)


def test_causality_check_catches_a_split_with_the_wrong_transpose():
    class WrongSplit(CausalSelfAttention):
        def split_heads(self, x):
            batch, n_tokens, width = x.shape
            return x.reshape(batch, self.n_head, width // self.n_head, n_tokens).swapaxes(-1, -2)

        def merge_heads(self, x):
            batch, n_head, n_tokens, head_size = x.shape
            return x.swapaxes(-1, -2).reshape(batch, n_tokens, n_head * head_size)

    layer = WrongSplit(8, 2, rng=rng(7), dtype=np.float64)
    assert_all_below(check_layer(layer, rng(8).standard_normal((2, 6, 8)), rng(9)))  # the referee is fooled...
    assert later_change_moves_earlier_output(layer, 6, 2)  # ...the causality check is not


def test_each_sequence_is_independent_of_the_rest_of_the_batch():
    r = rng(8)
    layer = CausalSelfAttention(8, 4, rng=r, dtype=np.float64)
    x = r.standard_normal((3, 5, 8))
    together = layer.forward(x)
    for b in range(3):
        np.testing.assert_allclose(layer.forward(x[b : b + 1])[0], together[b], rtol=1e-12, atol=1e-12)
    dy = r.standard_normal(x.shape)
    layer.forward(x)
    dx = layer.backward(dy)
    layer.forward(x[1:2])
    np.testing.assert_allclose(layer.backward(dy[1:2])[0], dx[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_through_forward_and_backward(dtype):
    r = rng(9)
    layer = CausalSelfAttention(8, 2, rng=r, dtype=dtype)
    x = r.standard_normal((2, 3, 8)).astype(dtype)
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    assert all(grad.dtype == dtype for grad in layer.grads.values())


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((2, 3, 8)), "float32"),
        (np.zeros((2, 3, 7), dtype=np.float32), r"\(\.\.\., 8\)"),
        (np.zeros((3, 8), dtype=np.float32), r"\(batch, tokens, 8\)"),
        ([[[0.0] * 8]], "float32"),
    ],
)
def test_bad_inputs_are_one_clear_error(x, message):
    layer = CausalSelfAttention(8, 2, rng=rng(), dtype=np.float32)
    with pytest.raises(ScratchLMError, match=message):
        layer.forward(x)


def test_bad_construction_and_ids_are_clear_errors():
    with pytest.raises(ScratchLMError, match="d_model=10"):
        CausalSelfAttention(10, 4, rng=rng())
    model = TinyAttentionLM(5, 4, 8, 2, rng=rng())
    with pytest.raises(ScratchLMError, match="id 5"):
        model.forward(np.array([[1, 5]]))
    with pytest.raises(ScratchLMError, match=r"1\.\.4"):
        model.forward(np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ScratchLMError, match="targets"):
        softmax_cross_entropy(np.zeros((2, 5)), np.array([0, 5]))
    with pytest.raises(ScratchLMError, match="got 1"):
        held_out_nll(model, np.array([3]))


# --- the tiny model ------------------------------------------------------------------------------


def test_training_is_deterministic_and_learns():
    text = np.tile(np.array([0, 1, 2, 3, 2, 1], dtype=np.int64), 200)

    def train(seed):
        model = TinyAttentionLM(4, 8, 16, 2, rng=np.random.default_rng(seed))
        curve = gradient_descent(model, text, steps=60, batch_size=8, learning_rate=0.3, rng=np.random.default_rng(seed))
        return curve, held_out_nll(model, text[:100])

    (curve, nll), (again, nll_again) = train(0), train(0)
    assert curve == again and nll == nll_again
    assert nll < 0.5 * curve[0][1]


def test_held_out_nll_counts_every_character_once():
    model = TinyAttentionLM(4, 8, 16, 2, rng=rng(), dtype=np.float64)
    ids = np.arange(21) % 4  # 20 predictions: two full windows of 8 and a tail of 4
    logits = np.concatenate([model.forward(ids[None, :8]), model.forward(ids[None, 8:16]), model.forward(ids[None, 16:20])], axis=1)
    expected, _ = softmax_cross_entropy(logits, ids[None, 1:])
    assert held_out_nll(model, ids) == pytest.approx(expected)


# --- the command line ----------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "scratchlm", "attention", *args], capture_output=True, text=True)


def test_bench_command_prints_one_json_object():
    done = run_cli("bench", "--json", "--repeat", "1", "--tokens", "16")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n_tokens"] == 16 and result["ratio_to_matmul"] > 0


def test_bench_command_bad_value_is_one_line_and_status_2():
    done = run_cli("bench", "--n-head", "3")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "n_head=3" in done.stderr


def test_train_command_writes_a_record(tmp_path: Path):
    require_data("tinyshakespeare/input.txt")
    record_path = tmp_path / "run.json"
    small = ["--steps", "3", "--eval-every", "2", "--d-model", "8", "--n-head", "2", "--block-size", "8", "--batch-size", "2"]
    done = run_cli("train", *small, "--json", "--record", str(record_path))
    assert done.returncode == 0, done.stderr
    printed, record = json.loads(done.stdout), read_record(record_path)
    assert record["curves"]["step"] == [2, 3] and record["config"] == printed["config"]
    assert record["metrics"]["held_out_nll"] == record["curves"]["val_nll"][-1]


@pytest.mark.parametrize("args, message", [(["--learning-rate", "0"], "--learning-rate"), (["--corpus", "no-such"], "no-such")])
def test_train_command_bad_values_are_one_line_and_status_2(args, message):
    done = run_cli("train", *args)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and message in done.stderr


def test_long_run_record_reproduces_its_first_evaluation():
    require_data("tinyshakespeare/input.txt")
    record = read_record(ROOT / "book" / "_runs" / "attention_tiny_long.json")
    config = dict(record["config"], steps=record["config"]["eval_every"])
    options = [item for name, value in config.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    # One BLAS thread, as the record was made: with small matrices, extra threads only cost time.
    done = subprocess.run([sys.executable, "-m", "scratchlm", "attention", "train", *options, "--json"],
                          capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    curves = json.loads(done.stdout)["curves"]
    assert curves["step"][0] == record["curves"]["step"][0]
    # float32 sums may round differently with another BLAS or thread count: equal to 4 digits, not bit for bit
    assert curves["train_loss"][0] == pytest.approx(record["curves"]["train_loss"][0], rel=1e-4)
    assert curves["val_nll"][0] == pytest.approx(record["curves"]["val_nll"][0], rel=1e-4)


# ---------------------------------------------------------------- the count trigram baseline


def test_trigram_nll_equals_a_hand_computation():
    from collections import Counter

    from scratchlm.bigram import CountTrigram

    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 5, size=300), rng.integers(0, 5, size=40)
    trigrams = Counter(zip(train[:-2], train[1:-1], train[2:]))
    contexts = Counter(zip(train[:-2], train[1:-1]))
    for k in (0.1, 1.0):
        expected = -np.mean([np.log((trigrams[a, b, c] + k) / (contexts[a, b] + 5 * k))
                             for a, b, c in zip(val[:-2], val[1:-1], val[2:])])
        assert CountTrigram.fit(train, 5, k).nll(val) == pytest.approx(expected, rel=1e-12)


def test_trigram_probabilities_sum_to_one_for_seen_and_unseen_contexts():
    from scratchlm.bigram import CountTrigram

    model = CountTrigram([0, 1, 2, 0, 1, 3, 1, 1], 4, smoothing=0.5)
    for a, b in [(0, 1), (3, 3)]:  # (0, 1) was seen twice, (3, 3) never
        total = sum(np.exp(-model.nll([a, b, c])) for c in range(4))
        assert total == pytest.approx(1.0, rel=1e-12)
    unsmoothed = CountTrigram([0, 1, 2, 0, 1, 2], 4, smoothing=0.0)
    assert unsmoothed.nll([0, 1, 3]) == np.inf  # a seen context, an unseen trigram
    assert unsmoothed.nll([3, 3, 3]) == pytest.approx(np.log(4))  # no evidence: uniform


def test_trigram_refuses_bad_smoothing_and_ids():
    from scratchlm.bigram import CountTrigram

    with pytest.raises(ScratchLMError, match="-1"):
        CountTrigram([0, 1, 2], 3, smoothing=-1)
    with pytest.raises(ScratchLMError, match="at least 3"):
        CountTrigram([0, 1], 3)
    with pytest.raises(ScratchLMError, match="out of range"):
        CountTrigram([0, 1, 2], 3).nll([0, 1, 5])


def test_tune_smoothing_picks_the_best_candidate_on_the_training_tail():
    from scratchlm.bigram import CountBigram, tune_smoothing

    ids = np.random.default_rng(1).integers(0, 6, size=500)
    candidates = (0.01, 1.0, 100.0)
    best = tune_smoothing(CountBigram, ids, 6, candidates)
    scores = [CountBigram.fit(ids[:450], 6, k).nll(ids[450:]) for k in candidates]
    assert best == candidates[int(np.argmin(scores))]


def test_tune_smoothing_refuses_too_few_ids_for_a_trigram_tail_with_one_line():
    from scratchlm.bigram import CountTrigram, tune_smoothing

    ids = np.arange(30) % 5
    assert tune_smoothing(CountTrigram, ids, 5) > 0  # a tail of 3: just enough
    with pytest.raises(ScratchLMError, match="need at least 30 token ids, got 29"):
        tune_smoothing(CountTrigram, ids[:29], 5)


def test_tuned_trigram_baseline_on_tiny_shakespeare():
    """The number Chapter 4 compares its attention model with, pinned."""
    require_data("tinyshakespeare/input.txt")
    from scratchlm.attention import character_data
    from scratchlm.bigram import CountTrigram, tune_smoothing

    tokenizer, train_ids, val_ids = character_data("tinyshakespeare")
    k = tune_smoothing(CountTrigram, train_ids, tokenizer.vocab_size)
    assert k == 0.1
    nll = CountTrigram.fit(train_ids, tokenizer.vocab_size, k).nll(val_ids)
    assert nll == pytest.approx(2.0458, abs=1e-4)
    # better than the long attention run it is compared with in the chapter
    record = read_record(ROOT / "book" / "_runs" / "attention_tiny_long.json")
    assert nll < record["metrics"]["held_out_nll"]


# ---------------------------------------------------------------- mutation testing (tests/MUTATION.md)


def test_trigram_scores_its_own_text_like_a_hand_count_with_add_one_by_default():
    """Every trigram of the text is queried, the one with the largest code included."""
    from collections import Counter

    from scratchlm.bigram import CountTrigram

    ids = np.random.default_rng(2).integers(0, 4, size=200)
    trigrams = Counter(zip(ids[:-2], ids[1:-1], ids[2:]))
    contexts = Counter(zip(ids[:-2], ids[1:-1]))
    expected = -np.mean([np.log((trigrams[a, b, c] + 1) / (contexts[a, b] + 4))
                         for a, b, c in zip(ids[:-2], ids[1:-1], ids[2:])])
    assert CountTrigram.fit(ids, 4).nll(ids) == pytest.approx(expected, rel=1e-12)
    assert CountTrigram(ids, 4).nll(ids) == pytest.approx(expected, rel=1e-12)


def test_trigram_scores_three_ids_refuses_two_and_warns_for_nothing():
    from scratchlm.bigram import CountTrigram

    model = CountTrigram([0, 1, 2, 0, 1, 2], 4, smoothing=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.nll([0, 1, 3]) == np.inf
    with pytest.raises(ScratchLMError, match="need at least 3 token ids, got 2"):
        model.nll([0, 1])


def test_relative_error_is_scale_free_and_zero_for_zero_gradients():
    from scratchlm.gradcheck import relative_error

    assert relative_error(np.array([1e-3, 0.0]), np.array([2e-3, 0.0])) == pytest.approx(0.5)
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.zeros(0), np.zeros(0)) == 0.0


def test_gradient_checks_use_the_eps_they_are_given():
    """Central differences of a cubic are off by eps^2 per entry: visible for a large eps."""
    from scratchlm.layers import Layer

    class Cube(Layer):
        def __init__(self):
            self.params, self.grads = {}, {}

        def forward(self, x):
            self.x = x
            return x**3

        def backward(self, dy):
            return 3 * self.x**2 * dy

    x = np.array([[1.0, 2.0]])
    assert check_layer(Cube(), x, np.random.default_rng(0), eps=0.1)["input"] > 1e-4
    assert check_layer(Cube(), x, np.random.default_rng(0))["input"] < 1e-6
    a = np.array([1.0, 2.0])
    errors = check_gradients(lambda: float((a**3).sum()), {"a": a}, {"a": 3 * a**2}, eps=0.1)
    assert errors["a"] > 1e-4


def test_layer_input_errors_name_the_layer_and_what_it_got():
    rng = np.random.default_rng(0)
    linear = Linear(2, 3, rng=rng)
    assert "bias" in linear.params  # biases unless asked not to
    for x, got in [([[1.0, 2.0]], "got list"), (np.ones((1, 2)), "got float64")]:
        with pytest.raises(ScratchLMError, match=f"Linear expects a float32 array, {got}"):
            linear.forward(x)
    embedding = Embedding(5, 2, rng=rng)
    with pytest.raises(ScratchLMError, match="Embedding expects integer ids, got float64"):
        embedding.forward(np.zeros(2))
    with pytest.raises(ScratchLMError, match="id 7 is out of range for an embedding of 5 rows"):
        embedding.forward(np.array([0, 7]))
    with pytest.raises(ScratchLMError, match=r"targets of shape \(3,\) do not match logits of shape \(2, 4\)"):
        softmax_cross_entropy(np.zeros((2, 4)), np.zeros(3, dtype=int))


# ---- the commands and the training loop, in process (so that mutation testing sees them) ----


CORPUS_TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 40  # 1,920 characters


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return path


def run_main(capsys, monkeypatch, *argv):
    from scratchlm.cli import main

    monkeypatch.setattr(sys, "argv", ["scratchlm", "attention", *map(str, argv)])
    code = main(["attention", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ("--steps", 5, "--eval-every", 2, "--d-model", 8, "--n-head", 2, "--block-size", 8, "--batch-size", 2)


def test_attention_flops_count_projections_and_both_products_three_times():
    assert attention_flops(1, 1, 1) == 3 * (8 + 4)
    # B=2, T=3, C=4: projections 8*6*16 = 768, products 4*2*9*4 = 288
    assert attention_flops(2, 3, 4) == 3 * (768 + 288)


def test_median_seconds_warms_up_once_and_takes_the_median(monkeypatch):
    import scratchlm.attention as attention

    clock = {"now": 0.0, "calls": 0}
    durations = iter([1000.0, 1.0, 100.0, 2.0])  # the warm-up call's time is never measured

    def work():
        clock["calls"] += 1
        clock["now"] += next(durations)

    monkeypatch.setattr(attention.time, "perf_counter", lambda: clock["now"])
    assert attention.median_seconds(work, 3) == 2.0 and clock["calls"] == 4


def test_benchmark_times_the_layer_against_a_matmul_of_the_same_flops():
    result = benchmark(d_model=64, n_head=2, batch=2, n_tokens=16, repeat=2, seed=1)
    flops = attention_flops(2, 16, 64)
    assert {k: result[k] for k in ("d_model", "n_head", "batch", "n_tokens", "dtype")} == {
        "d_model": 64, "n_head": 2, "batch": 2, "n_tokens": 16, "dtype": "float32"}
    assert result["gflop"] == flops / 1e9
    assert result["layer_ms"] > 0 and result["matmul_ms"] > 0
    assert result["layer_gflops"] == pytest.approx(flops / (result["layer_ms"] / 1e3) / 1e9)
    # the matmul's width is rounded to a whole number of columns: its FLOPs match to within one column
    matmul_flops = result["matmul_gflops"] * 1e9 * result["matmul_ms"] / 1e3
    assert abs(matmul_flops - flops) <= 2 * 2 * 16 * 64
    # both really compute: one CPU core does not reach 5,000 GFLOP/s
    assert result["matmul_gflops"] < 5000 and result["layer_gflops"] < 5000
    assert result["ratio_to_matmul"] == pytest.approx(result["layer_ms"] / result["matmul_ms"])


def test_bench_command_prints_the_timing_or_one_json_object(capsys, monkeypatch):
    args = ("bench", "--d-model", 16, "--n-head", 2, "--batch", 2, "--tokens", 8, "--repeat", 1)
    code, out, _ = run_main(capsys, monkeypatch, *args, "--json")
    result = json.loads(out)
    assert code == 0 and (result["d_model"], result["n_head"], result["batch"], result["n_tokens"]) == (16, 2, 2, 8)
    code, out, _ = run_main(capsys, monkeypatch, *args)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0] == "causal self-attention, d_model 16, 2 heads, batch 2 x 8 tokens, float32"
    assert re.fullmatch(r"  forward\+backward: +\d+\.\d\d ms  \(\d+\.\d GFLOP/s\)", lines[1])
    assert re.fullmatch(r"  matmul, same \d\.\d{3} GFLOP: +\d+\.\d\d ms  \(\d+\.\d GFLOP/s\)", lines[2])
    assert re.fullmatch(r"  ratio: \d+\.\d\dx the time of the matmul", lines[3])


@pytest.mark.parametrize("name", ["d-model", "n-head", "batch", "tokens", "repeat"])
def test_bench_command_refuses_a_size_that_is_not_positive(capsys, monkeypatch, name):
    code, out, err = run_main(capsys, monkeypatch, "bench", f"--{name}", 0)
    assert code == 2 and out == "" and err == f"error: --{name} must be positive, got 0\n"


def test_commands_default_to_the_chapters_settings():
    from scratchlm.attention import TRAIN_DEFAULTS
    from scratchlm.cli import build_parser

    args = build_parser().parse_args(["attention", "bench"])
    assert (args.d_model, args.n_head, args.batch, args.tokens, args.repeat, args.json) == (128, 4, 12, 64, 20, False)
    args = build_parser().parse_args(["attention", "train"])
    assert {name: getattr(args, name) for name in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    assert args.record is None and args.json is False
    args = build_parser().parse_args(["attention", "train", "--learning-rate", "0.5", "--steps", "7"])
    assert args.learning_rate == 0.5 and args.steps == 7


def test_random_windows_pair_each_position_with_the_next_token():
    ids = np.arange(100) * 3
    inputs, targets = random_windows(ids, 6, 10, np.random.default_rng(0))
    assert inputs.shape == targets.shape == (6, 10)
    assert np.array_equal(targets, inputs + 3) and np.array_equal(np.diff(inputs, axis=1), np.full((6, 9), 3))
    starts = [random_windows(ids, 1, 10, np.random.default_rng(s))[0][0, 0] // 3 for s in range(200)]
    assert min(starts) == 0 and max(starts) == 89  # every start whose target is still in the text
    inputs, targets = random_windows(ids[:11], 3, 10, np.random.default_rng(0))  # just long enough
    assert np.array_equal(inputs, np.tile(ids[:10], (3, 1))) and np.array_equal(targets, np.tile(ids[1:11], (3, 1)))
    with pytest.raises(ScratchLMError, match="^a text of 10 tokens is too short for windows of 10$"):
        random_windows(ids[:10], 3, 10, np.random.default_rng(0))


def test_held_out_nll_does_not_depend_on_the_batch_size_and_needs_two_tokens():
    model = TinyAttentionLM(4, 8, 16, 2, rng=rng(), dtype=np.float64)
    ids = np.arange(45) % 4
    assert held_out_nll(model, ids, batch_size=1) == pytest.approx(held_out_nll(model, ids), rel=1e-12)
    assert held_out_nll(model, ids[:2]) == pytest.approx(
        -float(np.log(softmax(model.forward(ids[None, :1]))[0, 0, 1])))
    with pytest.raises(ScratchLMError, match="^need at least 2 tokens to measure a next-token loss, got 1$"):
        held_out_nll(model, ids[:1])
    # 16 predictions fill two windows of 8 exactly: no empty third window
    expected, _ = softmax_cross_entropy(model.forward(ids[:16].reshape(2, 8)), ids[1:17].reshape(2, 8))
    assert held_out_nll(model, ids[:17]) == pytest.approx(expected)


def test_gradient_descent_logs_every_so_often_and_the_last_step_and_stops_on_divergence():
    text = np.tile(np.array([0, 1, 2, 3, 2, 1], dtype=np.int64), 50)
    model = TinyAttentionLM(4, 8, 16, 2, rng=rng())
    curve = gradient_descent(model, text, steps=7, batch_size=4, learning_rate=0.1, rng=rng(1), log_every=3)
    assert [step for step, _ in curve] == [0, 3, 6]
    curve = gradient_descent(model, text, steps=52, batch_size=4, learning_rate=0.1, rng=rng(1))
    assert [step for step, _ in curve] == [0, 50, 51]  # the default logs every 50 steps, and the last
    model = TinyAttentionLM(4, 8, 16, 2, rng=rng())
    with np.errstate(all="ignore"), pytest.raises(ScratchLMError, match="loss at step"):
        gradient_descent(model, text, steps=20, batch_size=4, learning_rate=1e30, rng=rng(1))


def test_train_tiny_evaluates_every_eval_every_steps_and_once_at_the_end(corpus_file):
    from scratchlm.attention import TRAIN_DEFAULTS, character_data, train_tiny

    config = dict(TRAIN_DEFAULTS, corpus=str(corpus_file), steps=7, eval_every=3, d_model=8, n_head=2,
                  block_size=8, batch_size=2)
    model, curves = train_tiny(config)
    assert curves["step"] == [3, 6, 7] and len(curves["train_loss"]) == len(curves["val_nll"]) == 3
    assert all(type(x) is float for x in curves["train_loss"] + curves["val_nll"])
    tokenizer, train_ids, val_ids = character_data(str(corpus_file))
    assert model.block_size == 8 and model.params["token.weight"].shape == (tokenizer.vocab_size, 8)
    assert curves["val_nll"][-1] == held_out_nll(model, val_ids)
    # the same seed gives the same run; the first chunk's loss is the mean over all three of its steps
    again = TinyAttentionLM(tokenizer.vocab_size, 8, 8, 2, rng=np.random.default_rng(0))
    losses = gradient_descent(again, train_ids, steps=3, batch_size=2, learning_rate=1.0,
                              rng=np.random.default_rng(1), log_every=1)
    assert curves["train_loss"][0] == pytest.approx(np.mean([loss for _, loss in losses]), rel=1e-6)
    assert train_tiny(config)[1] == curves
    assert train_tiny(dict(config, seed=1))[1] != curves


def test_character_data_is_chapter_ones_tokenizer_and_split(corpus_file):
    from scratchlm.attention import character_data
    from scratchlm.chars import CharTokenizer
    from scratchlm.data import train_val_split

    tokenizer, train_ids, val_ids = character_data(str(corpus_file))
    train_text, val_text = train_val_split(CORPUS_TEXT)
    assert tokenizer.decode(train_ids) == train_text and tokenizer.decode(val_ids) == val_text
    assert tokenizer.vocab_size == CharTokenizer.from_text(CORPUS_TEXT).vocab_size


def test_train_command_reports_and_records_the_run(capsys, monkeypatch, tmp_path, corpus_file):
    from scratchlm.attention import character_data
    from scratchlm.bigram import CountBigram

    record = tmp_path / "run.json"
    code, out, _ = run_main(capsys, monkeypatch, "train", "--corpus", corpus_file, *SMALL, "--json",
                            "--record", record)
    printed, saved = json.loads(out), read_record(record)
    assert code == 0 and set(printed) == {"config", "metrics", "curves", "elapsed_seconds"}
    assert printed["config"] == {"corpus": str(corpus_file), "d_model": 8, "n_head": 2, "block_size": 8,
                                 "batch_size": 2, "learning_rate": 1.0, "steps": 5, "eval_every": 2, "seed": 0}
    assert printed["curves"]["step"] == [2, 4, 5]
    tokenizer, train_ids, val_ids = character_data(str(corpus_file))
    metrics = printed["metrics"]
    assert metrics["held_out_nll"] == printed["curves"]["val_nll"][-1]
    assert metrics["bigram_nll"] == pytest.approx(CountBigram.fit(train_ids, tokenizer.vocab_size, smoothing=1.0)
                                                  .nll(val_ids))
    model = TinyAttentionLM(tokenizer.vocab_size, 8, 8, 2, rng=rng())
    assert metrics["n_params"] == sum(p.size for p in model.params.values())
    assert saved["config"] == printed["config"] and saved["metrics"] == metrics
    assert saved["curves"] == printed["curves"] and saved["command"].startswith("python -m scratchlm attention train")
    assert 0 <= printed["elapsed_seconds"] < 60 and 0 <= saved["elapsed_seconds"] < 60
    code, out, _ = run_main(capsys, monkeypatch, "train", "--corpus", corpus_file, *SMALL)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    for line, step in zip(lines, ("      2", "      4", "      5")):
        assert re.fullmatch(rf"step {step}  training loss \d+\.\d{{4}}  held-out NLL \d+\.\d{{4}}", line)
    assert lines[2].endswith(f"held-out NLL {metrics['held_out_nll']:.4f}")
    assert re.fullmatch(rf"held-out NLL {metrics['held_out_nll']:.4f} nats/char \(count bigram "
                        rf"{metrics['bigram_nll']:.4f}\), \d+ s", lines[3])


@pytest.mark.parametrize("name", ["d-model", "n-head", "block-size", "batch-size", "learning-rate", "steps",
                                  "eval-every"])
def test_train_command_refuses_a_setting_that_is_not_positive(capsys, monkeypatch, name, corpus_file):
    code, out, err = run_main(capsys, monkeypatch, "train", "--corpus", corpus_file, f"--{name}", 0)
    assert code == 2 and out == "" and err.startswith(f"error: --{name} must be positive, got 0")


def test_train_command_accepts_seed_zero_and_any_corpus_name_it_can_read(capsys, monkeypatch, corpus_file):
    code, _, _ = run_main(capsys, monkeypatch, "train", "--corpus", corpus_file, *SMALL, "--seed", 0, "--json")
    assert code == 0


def test_benchmark_defaults_to_the_chapters_layer():
    result = benchmark(repeat=1)
    assert (result["d_model"], result["n_head"], result["batch"], result["n_tokens"]) == (128, 4, 12, 64)


def test_bench_command_times_as_many_calls_as_asked(capsys, monkeypatch):
    import scratchlm.attention as attention

    repeats, median_seconds = [], attention.median_seconds

    def counting(work, repeat):
        repeats.append(repeat)
        return median_seconds(work, repeat)

    monkeypatch.setattr(attention, "median_seconds", counting)
    code, _, _ = run_main(capsys, monkeypatch, "bench", "--d-model", 8, "--n-head", 2, "--batch", 1, "--tokens", 4,
                          "--repeat", 3, "--json")
    assert code == 0 and repeats == [3, 3]  # the layer, then the matmul


def test_the_tiny_model_names_its_parameters_and_keeps_its_dtype():
    model = TinyAttentionLM(5, 4, 8, 2, rng=rng())
    assert model.dtype == np.float32 and TinyAttentionLM(5, 4, 8, 2, rng=rng(), dtype=np.float64).dtype == np.float64
    assert set(model.params) == {
        "token.weight", "position.weight", "attention.qkv.weight", "attention.qkv.bias", "attention.proj.weight",
        "attention.proj.bias", "head.weight", "head.bias"}
    with pytest.raises(ScratchLMError, match=r"expected ids of shape \(batch, 1\.\.4\), got \(1, 0\)"):
        model.forward(np.zeros((1, 0), dtype=np.int64))
    with pytest.raises(ScratchLMError, match=r"got \(4,\)"):
        model.forward(np.zeros(4, dtype=np.int64))


def test_the_attention_command_needs_a_subcommand(capsys):
    from scratchlm.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["attention"])
    assert caught.value.code == 2 and "required: COMMAND" in capsys.readouterr().err


def test_attention_input_errors_name_the_layer():
    layer = CausalSelfAttention(8, 2, rng=rng())
    with pytest.raises(ScratchLMError, match="^CausalSelfAttention expects a float32 array, got float64$"):
        layer.forward(np.zeros((1, 2, 8)))
    with pytest.raises(ScratchLMError, match=r"^CausalSelfAttention expects inputs of shape \(\.\.\., 8\), got \(1, 2, 4\)$"):
        layer.forward(np.zeros((1, 2, 4), dtype=np.float32))


def test_masked_softmax_leaves_its_input_alone_unless_told_to_work_in_place():
    scores = np.random.default_rng(0).standard_normal((2, 3, 3))
    before = scores.copy()
    probs = masked_softmax(scores, causal_mask(3))
    assert np.array_equal(scores, before) and not np.shares_memory(probs, scores)
    probs = masked_softmax(scores, causal_mask(3), in_place=True)
    assert np.shares_memory(probs, scores) and np.allclose(probs.sum(axis=-1), 1.0)


def test_every_option_of_the_attention_commands_says_what_it_does_in_help():
    assert_documented("attention")
