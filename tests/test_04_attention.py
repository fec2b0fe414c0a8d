"""Chapter 4: the layer convention, softmax, attention and the tiny attention model."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_data
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.attention import (
    CausalSelfAttention,
    TinyAttentionLM,
    attention_backward,
    attention_forward,
    causal_mask,
    gradient_descent,
    held_out_nll,
    masked_softmax,
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
