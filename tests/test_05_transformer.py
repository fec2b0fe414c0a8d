"""Chapter 5: LayerNorm, GELU, the MLP, the pre-LN block and the GPT with its tied head."""

import json
import math
import os
import re
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeClock

from scratchlm import transformer
from scratchlm.errors import ScratchLMError
from scratchlm.gradcheck import check_gradients, check_layer
from scratchlm.runs import read_record
from scratchlm.transformer import (
    GPT,
    IGNORE,
    MLP,
    Block,
    GPTConfig,
    LayerNorm,
    activation_memory,
    count_params,
    cross_entropy,
    gelu,
    DataParallel,
    gelu_backward,
    gpt_flops,
)

TOLERANCE = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_all_below(errors):
    assert errors, "nothing was checked"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"


def tiny_config(**changes):
    values = dict(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    return GPTConfig(**{**values, **changes})


def ids_and_targets(config, batch=2, n_tokens=None, seed=1):
    r = rng(seed)
    shape = (batch, n_tokens or config.block_size)
    return r.integers(0, config.vocab_size, shape), r.integers(0, config.vocab_size, shape)


# --- the layers, in float64 against finite differences ------------------------------------


def test_layernorm_gradients_match_finite_differences():
    r = rng(1)
    layer = LayerNorm(6, dtype=np.float64)
    layer.params["weight"][:] = r.standard_normal(6)  # not the all-ones start: every term counts
    layer.params["bias"][:] = r.standard_normal(6)
    assert_all_below(check_layer(layer, 3.0 * r.standard_normal((2, 3, 6)) + 1.0, r))


def test_layernorm_normalises_and_keeps_a_constant_row_finite():
    layer = LayerNorm(4, dtype=np.float64)
    y = layer.forward(np.array([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(y[0].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(y[0].var(), 1.0, rtol=1e-4)  # eps=1e-5 shrinks it a little
    assert (y[1] == 0).all()
    assert np.isfinite(layer.backward(np.ones_like(y))).all()


def test_layernorm_gradient_has_no_part_along_the_directions_it_removes():
    r = rng(2)
    # exactly so only without eps: with it, dx . xhat is of order eps / variance
    layer = LayerNorm(5, eps=0.0, dtype=np.float64)
    x = r.standard_normal((4, 5))
    layer.forward(x)
    dx = layer.backward(r.standard_normal((4, 5)))
    np.testing.assert_allclose(dx.sum(axis=-1), 0.0, atol=1e-12)  # a shift of the row
    np.testing.assert_allclose((dx * layer.xhat).sum(axis=-1), 0.0, atol=1e-12)  # a scaling


def test_gelu_gradient_matches_finite_differences():
    r = rng(3)
    x, weights = 3.0 * r.standard_normal((4, 7)), r.standard_normal((4, 7))
    y, tanh = gelu(x)
    analytic = gelu_backward(x, tanh, weights)
    errors = check_gradients(lambda: float((weights * gelu(x)[0]).sum()), {"x": x}, {"x": analytic})
    assert_all_below(errors)


def test_gelu_is_close_to_the_exact_erf_form():
    x = np.linspace(-6, 6, 241)
    exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    assert np.abs(gelu(x)[0] - exact).max() < 1e-3
    assert gelu(np.array([0.0]))[0][0] == 0.0


def test_mlp_and_block_gradients_match_finite_differences():
    r = rng(4)
    assert_all_below(check_layer(MLP(6, rng=r, dtype=np.float64), r.standard_normal((2, 3, 6)), r))
    block = Block(8, 2, rng=r, dtype=np.float64)
    errors = check_layer(block, r.standard_normal((2, 5, 8)), r)
    assert set(block.params) < set(errors)  # every parameter, and the input
    assert_all_below(errors)


# --- the whole GPT --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_whole_gpt_gradients_match_finite_differences_on_every_tensor(bias):
    config = tiny_config(dtype="float64", bias=bias)
    r = rng(5)
    model = GPT(config, rng=r)
    # GPT-2's std of 0.02 makes some gradients (those of the first block, reached through two
    # LayerNorms of small inputs) so small that finite differences of a loss near ln(11) lose
    # their last digits to rounding: the relative error then measures float64 noise, about
    # 1e-6, not the backward pass. Drawing every parameter with std 0.5 instead gives
    # gradients of comparable size everywhere, with the same code and the same paths.
    for param in model.params.values():
        param[...] = r.normal(0.0, 0.5, param.shape)
    ids, targets = ids_and_targets(config)
    targets[0, :2] = IGNORE  # ignored targets must not leak into any gradient

    def loss():
        return model.forward(ids, targets)[1]

    model.zero_grads()
    loss()
    model.backward(scale=0.5)  # the scale is part of what is checked
    analytic = {name: 2.0 * grad for name, grad in model.grads.items()}
    errors = check_gradients(loss, dict(model.params), analytic)
    assert set(errors) == set(model.params) and len(errors) == (28 if bias else 15)
    assert_all_below(errors)


def test_the_tied_table_gets_the_sum_of_both_gradients():
    config = tiny_config(dtype="float64")
    model = GPT(config, rng=rng(6))
    ids, targets = ids_and_targets(config)
    model.forward(ids, targets)
    model.backward()
    both = model.grads["wte.weight"].copy()
    head_only = np.zeros_like(both)
    model.zero_grads()
    model.forward(ids, targets)
    model.head_backward(model.dlogits)
    head_only[...] = model.grads["wte.weight"]
    assert model.grads["wte.weight"] is model.wte.grads["weight"]  # one array, two writers
    assert np.abs(both - head_only).max() > 1e-3 * np.abs(both).max()  # the embedding's share


@pytest.mark.parametrize(
    "config",
    [
        tiny_config(),
        tiny_config(bias=False),
        GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
        GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=6, n_embd=192),
    ],
    ids=["tiny", "tiny-no-bias", "baby", "dostoevsky-base"],
)
def test_parameter_count_matches_the_closed_form(config):
    assert GPT(config, rng=rng()).n_params == count_params(config)


def test_parameter_names_are_the_ones_model_files_use():
    model = GPT(tiny_config(n_layer=1), rng=rng())
    block = [
        "ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "ln_2.weight", "ln_2.bias", "mlp.fc.weight", "mlp.fc.bias",
        "mlp.proj.weight", "mlp.proj.bias",
    ]
    expected = ["wte.weight", "wpe.weight", *(f"h.0.{name}" for name in block)]
    assert list(model.params) == expected + ["ln_f.weight", "ln_f.bias"]
    assert list(model.grads) == list(model.params)
    assert model.params["h.0.mlp.fc.weight"].shape == (8, 32)


def test_initialisation_is_gpt2s():
    config = GPTConfig(vocab_size=300, block_size=64, n_layer=8, n_head=4, n_embd=64)
    model = GPT(config, rng=rng(7))
    assert model.params["wte.weight"].std() == pytest.approx(0.02, rel=0.05)
    assert model.params["h.3.mlp.fc.weight"].std() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert model.params["h.3.mlp.proj.weight"].std() == pytest.approx(residual, rel=0.05)
    assert model.params["h.3.attn.proj.weight"].std() == pytest.approx(residual, rel=0.1)
    assert (model.params["h.3.ln_1.weight"] == 1).all() and (model.params["h.3.attn.qkv.bias"] == 0).all()


def test_same_seed_same_model_and_loss_other_seed_other_model():
    config = tiny_config()
    ids, targets = ids_and_targets(config)
    first, again, other = (GPT(config, rng=rng(seed)) for seed in (3, 3, 4))
    assert all(np.array_equal(first.params[n], again.params[n]) for n in first.params)
    assert first.forward(ids, targets)[1] == again.forward(ids, targets)[1]
    assert not np.array_equal(first.params["wte.weight"], other.params["wte.weight"])


def test_changing_a_token_changes_no_earlier_logit():
    config = tiny_config(dtype="float64", block_size=9)
    model = GPT(config, rng=rng(8))
    ids = rng(9).integers(0, config.vocab_size, (2, 9))
    before = model.forward(ids)
    for t in range(9):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 1) % config.vocab_size
        after = model.forward(changed)
        assert np.array_equal(after[:, :t], before[:, :t]), f"position {t} leaks backwards"
        assert not np.allclose(after[:, t], before[:, t])


def test_each_sequence_is_independent_of_the_rest_of_the_batch():
    config = tiny_config(dtype="float64")
    model = GPT(config, rng=rng(10))
    ids, targets = ids_and_targets(config, batch=3)
    together = model.forward(ids)
    for b in range(3):
        alone = model.forward(ids[b : b + 1])
        np.testing.assert_allclose(alone[0], together[b], rtol=1e-12, atol=1e-12)


def test_float32_and_float64_agree_and_float32_stays_float32():
    config = tiny_config()
    model32 = GPT(config, rng=rng(11))
    model64 = GPT(tiny_config(dtype="float64"), rng=rng(11))
    ids, targets = ids_and_targets(config)
    logits32, loss32 = model32.forward(ids, targets)
    logits64, loss64 = model64.forward(ids, targets)
    np.testing.assert_allclose(logits32, logits64, rtol=1e-4, atol=1e-5)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    # every activation a layer keeps for its backward pass, and every gradient, is float32
    kept = [logits32, model32.final, model32.dlogits]
    for block in model32.blocks:
        kept += [block.ln_1.xhat, block.ln_1.rstd, block.ln_2.xhat, block.ln_2.rstd]
        kept += [block.attn.probs, *block.attn.qkv_heads, block.mlp.hidden, block.mlp.factor]
        kept += [block.attn.qkv.x, block.attn.proj.x, block.mlp.fc.x, block.mlp.proj.x]
    assert all(array.dtype == np.float32 for array in kept)
    model32.backward()
    assert all(grad.dtype == np.float32 for grad in model32.grads.values())


def test_float32_stays_finite_on_large_inputs():
    config = tiny_config()
    model = GPT(config, rng=rng(12))
    for name, param in model.params.items():
        if name.startswith(("wte", "wpe")):
            param *= 1e5  # entries near 2e3: logits in the thousands
    ids, targets = ids_and_targets(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning is a failure too
        logits, loss = model.forward(ids, targets)
        model.backward()
    assert np.abs(logits).max() > 1e3 and np.isfinite(logits).all() and math.isfinite(loss)
    assert all(np.isfinite(grad).all() for grad in model.grads.values())


# --- the loss --------------------------------------------------------------------------------


def test_ignored_targets_count_for_nothing():
    r = rng(13)
    logits, targets = r.standard_normal((2, 5, 7)), r.integers(0, 7, (2, 5))
    targets[1, 1:] = IGNORE
    loss, dlogits = cross_entropy(logits, targets)
    counted = targets != IGNORE
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, np.maximum(targets, 0)[..., None], -1)[..., 0]
    assert loss == pytest.approx(expected[counted].mean())
    assert (dlogits[~counted] == 0).all()
    errors = check_gradients(lambda: cross_entropy(logits, targets)[0], {"logits": logits},
                             {"logits": dlogits})
    assert_all_below(errors)


@pytest.mark.parametrize(
    "targets, message",
    [
        (np.full((1, 3), IGNORE), "every target is ignored"),
        (np.array([[0, 7, 1]]), r"\[0, 7\)"),
        (np.array([[0, -2, 1]]), r"-2\.\.1"),
        (np.zeros((1, 3)), "integers"),
        (np.zeros((1, 4), dtype=np.int64), r"shape \(1, 3\), got int64 \(1, 4\)"),
    ],
)
def test_bad_targets_are_one_clear_error(targets, message):
    with pytest.raises(ScratchLMError, match=message):
        cross_entropy(np.zeros((1, 3, 7)), targets)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([[1, 11]]), "id 11 is out of range"),
        (np.array([[-1, 2]]), "id -1 is out of range"),
        (np.zeros((1, 7), dtype=np.int64), "7 tokens does not fit: block_size is 6"),
        (np.zeros((1, 0), dtype=np.int64), "0 tokens"),
        (np.zeros((1, 3)), "integer array of token ids, got float64"),
        ([[1, 2]], "got list"),
        (np.zeros(3, dtype=np.int64), r"\(batch, tokens\), got 1 dimensions"),
        (np.zeros((1, 2, 3), dtype=np.int64), "got 3 dimensions"),
    ],
)
def test_bad_ids_are_one_clear_error(ids, message):
    with pytest.raises(ScratchLMError, match=message):
        GPT(tiny_config(), rng=rng()).forward(ids)


def test_backward_needs_a_forward_with_targets_each_time():
    model = GPT(tiny_config(), rng=rng())
    ids, targets = ids_and_targets(model.config)
    with pytest.raises(ScratchLMError, match="forward"):
        model.backward()
    model.forward(ids)  # no targets: nothing to differentiate
    with pytest.raises(ScratchLMError, match="forward"):
        model.backward()
    model.forward(ids, targets)
    model.backward()
    with pytest.raises(ScratchLMError, match="forward"):
        model.backward()  # the gradient of the logits was used up


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_embd": 10, "n_head": 4}, "n_embd=10 is not divisible by n_head=4"),
        ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
        ({"block_size": 2.5}, "block_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"bias": "yes"}, "bias"),
        ({"dtype": "float16"}, "float16"),
        ({"dtype": "nonsense"}, "nonsense"),
    ],
)
def test_bad_config_is_one_clear_error(changes, message):
    with pytest.raises(ScratchLMError, match=message):
        tiny_config(**changes)


def test_config_round_trips_through_json_and_refuses_unknown_fields():
    config = tiny_config(dtype=np.float64, bias=False)
    assert config.dtype == "float64"
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ScratchLMError, match="unknown fields \\['dropout'\\]"):
        GPTConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ScratchLMError, match="missing \\['n_head'\\]"):
        GPTConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "n_head"})
    with pytest.raises(ScratchLMError, match="JSON object, got list"):
        GPTConfig.from_dict([1, 2])


# --- the benchmark ------------------------------------------------------------------------------


def test_flop_count_is_six_per_parameter_per_token_plus_attention():
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    n_tokens = 12 * 64
    matrices = config.n_layer * 12 * config.n_embd**2 + config.vocab_size * config.n_embd
    attention = config.n_layer * 3 * 4 * 12 * 64**2 * config.n_embd
    assert gpt_flops(config, 12, 64) == 6 * matrices * n_tokens + attention


def test_activation_memory_grows_with_the_block_size():
    rows = activation_memory(tiny_config(), batch=4, block_sizes=(16, 64))
    assert [row["block_size"] for row in rows] == [16, 64]
    assert 0 < rows[0]["kept_per_token"] < rows[0]["peak_per_token"]
    assert rows[1]["kept_per_token"] > rows[0]["kept_per_token"]  # the (T, T) maps


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "scratchlm", "gpt", *args],
                          capture_output=True, text=True)


def test_bench_command_prints_one_json_object():
    done = run_cli("bench", "--json", "--threads", "1", "--workers", "1", "--repeat", "1",
                   "--batch", "2", "--no-memory")
    assert done.returncode == 0, done.stderr
    (timing,) = json.loads(done.stdout)["timings"]
    assert timing["threads"] == "1" and timing["workers"] == 1
    assert timing["config"]["n_layer"] == 4
    assert timing["ratio_to_matmul"] > 0 and timing["tokens_per_second"] > 0
    assert {"embedding", "h.3.mlp", "ln_f + head", "loss and the rest"} <= set(timing["layers_ms"])


@pytest.mark.parametrize(
    "args", [["--threads", "0"], ["--threads", "a,b"], ["--repeat", "0"], ["--workers", "0"]]
)
def test_bench_command_bad_value_is_one_line_and_status_2(args):
    done = run_cli("bench", *args)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr


# ---------------------------------------------------------------- mutation testing (tests/MUTATION.md)


def test_layer_norm_defaults_to_gpt2s_eps_and_names_itself_in_errors():
    x = np.array([[1.0, 1.001, 0.999, 1.0]])  # a variance of the order of eps
    layer = LayerNorm(4, dtype=np.float64)
    y, _, _ = transformer.layer_norm(x, np.ones(4), None)
    np.testing.assert_allclose(y, layer.forward(x), rtol=1e-12)
    assert np.abs(y).max() < 0.5  # eps = 1e-5 shrinks it: no longer unit variance
    with pytest.raises(ScratchLMError, match=r"^LayerNorm expects a float64 array"):
        layer.forward(x.astype(np.float32))


def test_gelu_is_quiet_and_zero_far_below_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp overflows here: it must not warn
        y, s = gelu(np.array([-100.0, -1e4], dtype=np.float32))
    assert (y == 0).all() and (s == 0).all()


def test_the_mlp_and_block_have_biases_unless_told_not_to():
    assert {"fc.bias", "proj.bias"} <= set(MLP(4, rng=rng()).params)
    assert {"ln_1.bias", "mlp.fc.bias"} <= set(Block(4, 2, rng=rng()).params)
    assert "fc.bias" not in MLP(4, rng=rng(), bias=False).params


def test_a_single_token_is_a_sequence_the_model_reads():
    model = GPT(tiny_config(), rng=rng())
    assert model.forward(np.array([[3]])).shape == (1, 1, 11)


def test_interleaved_timing_skips_the_warm_up_and_reports_medians(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(transformer, "time", clock)
    work_seconds = iter([100.0, 2.0, 3.0, 9.0])  # the first call: a warm-up
    reference_seconds = iter([50.0, 1.0, 4.0, 1.0])
    timed = transformer.interleaved_seconds(
        lambda: clock.advance(next(work_seconds)),
        lambda: clock.advance(next(reference_seconds)),
        3,
    )
    # the median of the ratios (2, 0.75, 9), not the ratio of the medians (3 / 1)
    assert timed == (3.0, 1.0, 2.0)
    assert all(type(value) is float for value in timed)


def test_interleaved_timing_can_let_each_side_settle_before_it_is_timed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(transformer, "time", clock)
    calls = []

    def task(name, seconds):
        costs = iter(seconds)

        def run():
            calls.append(name)
            clock.advance(next(costs))

        return run

    # per side: a warm-up, then per pair one untimed call (slow) and one timed call
    work = task("w", [100.0, 50.0, 2.0, 50.0, 4.0])
    reference = task("r", [100.0, 50.0, 1.0, 50.0, 1.0])
    assert transformer.interleaved_seconds(work, reference, 2, settle=1) == (3.0, 1.0, 3.0)
    assert calls == ["w", "r"] + ["w", "w", "r", "r"] * 2


def slowed(method, seconds, clock):
    def slow(*args):
        clock.advance(seconds)
        return method(*args)

    return slow


def test_layer_times_split_a_step_by_piece_in_milliseconds(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(transformer, "time", clock)
    model = GPT(tiny_config(), rng=rng())
    model.forward = slowed(model.forward, 8.0, clock)  # the loss and the rest
    model.embed = slowed(model.embed, 1.0, clock)
    model.embed_backward = slowed(model.embed_backward, 0.25, clock)
    model.head = slowed(model.head, 7.0, clock)
    model.head_backward = slowed(model.head_backward, 0.5, clock)
    for block in model.blocks:
        block.forward = slowed(block.forward, 6.0, clock)  # the residual additions
        for seconds, name in enumerate(("ln_1", "attn", "ln_2", "mlp"), start=2):
            layer = getattr(block, name)
            layer.forward = slowed(layer.forward, float(seconds), clock)
            layer.backward = slowed(layer.backward, 0.125, clock)
    ids, targets = ids_and_targets(model.config)
    steps = []

    def step():
        steps.append(1)
        transformer.training_step(model, ids, targets)

    table = transformer.layer_times(model, step, repeat=2)
    assert len(steps) == 3  # a warm-up, then the timed steps
    expected = {"embedding": 1250.0}
    for i in range(2):
        for seconds, name in enumerate(("ln_1", "attn", "ln_2", "mlp"), start=2):
            expected[f"h.{i}.{name}"] = 1000.0 * seconds + 125.0
        expected[f"h.{i} residual"] = 6000.0
    expected["ln_f + head"] = 7500.0
    expected["loss and the rest"] = 8000.0
    assert list(table) == list(expected)  # the report's order
    assert table == pytest.approx(expected)


def test_benchmark_derives_its_rates_from_the_step_and_reference_times(monkeypatch):
    config = tiny_config(bias=False, vocab_size=13)
    seen, steps, real_step = {}, [], transformer.training_step

    def training_step(model, ids, targets, parallel=None):
        steps.append((ids.shape, parallel))
        real_step(model, ids, targets, parallel)

    def interleaved(work, reference, repeat):
        work(), reference()
        seen["repeat"] = repeat
        return 0.5, 0.25, 3.0

    def layer_times(model, step, repeat):
        seen.update(model=model, layers_repeat=repeat)
        before = len(steps)
        step()  # the step clocked is a training step of that same model
        shape, parallel = steps.pop()
        assert len(steps) == before
        seen.update(shape=shape, parallel=parallel)
        return {"embedding": 1.0}

    monkeypatch.setattr(transformer, "interleaved_seconds", interleaved)
    monkeypatch.setattr(transformer, "layer_times", layer_times)
    monkeypatch.setattr(transformer, "training_step", training_step)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    result = transformer.benchmark(config, batch=2, repeat=7, seed=5)
    flops = gpt_flops(config, 2, config.block_size)
    product = 2 * (2 * config.block_size) * config.n_embd * 3 * config.n_embd
    n_products = round(flops / product)  # the reference repeats (B T, C) @ (C, 3C)
    assert result == {
        "config": config.to_dict(), "batch": 2, "n_params": count_params(config),
        "threads": "3", "workers": 1, "step_ms": 500.0,
        "tokens_per_second": 2 * 6 / 0.5,
        "gflop": flops / 1e9, "gflops": flops / 0.5 / 1e9,
        "matmul_gflops": n_products * product / 0.25 / 1e9,
        "ratio_to_matmul": 3.0 * n_products * product / flops,
        "layers_ms": {"embedding": 1.0},
    }
    assert seen["repeat"] == seen["layers_repeat"] == 7
    assert steps == [((2, config.block_size), None)]  # the work timed is a step
    assert seen["shape"] == (2, config.block_size) and seen["parallel"] is None
    same_seed = GPT(config, rng=rng(5))  # the per-layer timing gets the seeded model
    for name, param in same_seed.params.items():
        np.testing.assert_array_equal(seen["model"].params[name], param)
    steps.clear()
    parallel = transformer.benchmark(config, batch=3, repeat=2, seed=5, workers=2)
    assert parallel["workers"] == 2
    ((_, timed),) = steps  # the step timed shares the batch out among two replicas
    assert len(timed.replicas) == 2 and timed.model is not seen["model"]
    assert seen["parallel"].model is seen["model"]  # the clocked model: replica 0
    assert seen["shape"] == (3, config.block_size)
    steps.clear()
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    assert transformer.benchmark(config, batch=2)["threads"] == "default"
    assert seen["repeat"] == 20  # the defaults: 20 timed steps of the seed-0 model
    for name, param in GPT(config, rng=rng(0)).params.items():
        np.testing.assert_array_equal(seen["model"].params[name], param)


def test_bench_batch_is_a_seeded_model_and_two_different_batches():
    config = tiny_config()
    model, ids, targets = transformer.bench_batch(config, 3, seed=4)
    again = transformer.bench_batch(config, 3, seed=4)
    assert ids.shape == targets.shape == (3, config.block_size)
    assert ids.min() >= 0 and max(ids.max(), targets.max()) < config.vocab_size
    assert not np.array_equal(ids, targets)
    np.testing.assert_array_equal(again[1], ids)
    table = model.params["wte.weight"]
    np.testing.assert_array_equal(again[0].params["wte.weight"], table)
    other = transformer.bench_batch(config, 3, seed=5)
    assert not np.array_equal(other[1], ids)
    assert len(np.unique(np.concatenate([ids, targets]))) == config.vocab_size


def test_other_thread_counts_run_in_a_child_process_with_the_variables_set(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    in_process, children = [], []

    def benchmark(**options):
        in_process.append(options)
        return {"threads": "3", "workers": options["workers"]}

    def run(command, env, capture_output, text, check):
        children.append((command, env))
        assert capture_output and text and check
        workers = int(command[command.index("--workers") + 1])
        printed = {"timings": [{"threads": env["OPENBLAS_NUM_THREADS"], "workers": workers}]}
        return subprocess.CompletedProcess(command, 0, json.dumps(printed))

    monkeypatch.setattr(transformer, "benchmark", benchmark)
    monkeypatch.setattr(transformer.subprocess, "run", run)
    results = transformer.benchmark_threads([3, 1], [1, 2], batch=2, repeat=4)
    assert results == [{"threads": t, "workers": w} for t in "31" for w in (1, 2)]
    assert in_process == [{"batch": 2, "repeat": 4, "workers": w} for w in (1, 2)]
    assert [command for command, _ in children] == [
        [sys.executable, "-m", "scratchlm", "gpt", "bench", "--json", "--threads", "1",
         "--workers", str(w), "--no-memory", "--batch", "2", "--repeat", "4"]
        for w in (1, 2)
    ]
    env = children[0][1]
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1"
    assert transformer.benchmark_threads([3], batch=1) == [{"threads": "3", "workers": 1}]
    assert env["SCRATCHLM_DATA"] == os.environ["SCRATCHLM_DATA"]  # the rest passed on


def test_activation_memory_counts_bytes_per_token_of_a_fresh_model():
    # A large vocabulary: what the forward pass keeps is then chiefly one (B, T, V)
    # float64 array, the gradient of the logits; its peak held two (the logits too).
    config = GPTConfig(vocab_size=4000, block_size=32, n_layer=1, n_head=1, n_embd=4,
                       dtype="float64")
    rows = activation_memory(config, batch=2, block_sizes=(8, 8, 32), seed=3)
    assert [row["block_size"] for row in rows] == [8, 8, 32]
    logits_bytes = config.vocab_size * 8  # per token
    for row in rows:
        assert logits_bytes < row["kept_per_token"] < 1.2 * logits_bytes
        assert 1.9 * logits_bytes < row["peak_per_token"] < 10 * logits_bytes
    first, again = rows[0]["kept_per_token"], rows[1]["kept_per_token"]
    assert again == pytest.approx(first, rel=0.1)  # a fresh model each time
    assert not tracemalloc.is_tracing()


def test_backward_scales_the_gradient_by_scale_and_defaults_to_the_loss_itself():
    config = tiny_config(dtype="float64")
    model = GPT(config, rng=rng(14))
    ids, targets = ids_and_targets(config)
    gradients = []
    for scale in (None, 2.0, 0.5):
        model.zero_grads()
        model.forward(ids, targets)
        model.backward() if scale is None else model.backward(scale=scale)
        gradients.append({name: grad.copy() for name, grad in model.grads.items()})
    plain, doubled, halved = gradients
    for name, grad in plain.items():
        np.testing.assert_allclose(doubled[name], 2.0 * grad, rtol=1e-12, atol=1e-18)
        np.testing.assert_allclose(halved[name], 0.5 * grad, rtol=1e-12, atol=1e-18)


def test_ignored_targets_get_no_gradient_also_when_most_targets_count():
    logits = rng(15).standard_normal((2, 6, 3))  # 12 rows, more than the 3 classes
    targets = rng(16).integers(0, 3, (2, 6))
    targets[0, 0] = targets[1, 5] = IGNORE
    _, dlogits = cross_entropy(logits, targets)
    assert (dlogits[0, 0] == 0).all() and (dlogits[1, 5] == 0).all()
    np.testing.assert_allclose(dlogits.sum(axis=-1), 0.0, atol=1e-15)


def timing(threads, step_ms, ratio, layers, workers=1):
    return {
        "config": transformer.BENCH_CONFIG.to_dict(), "batch": 12, "n_params": 789_760,
        "threads": threads, "workers": workers, "step_ms": step_ms,
        "tokens_per_second": 12_345.6,
        "gflop": 1.234, "gflops": 7.89, "matmul_gflops": 45.67,
        "ratio_to_matmul": ratio,
        "layers_ms": layers,
    }


def test_rounds_summary_gives_the_best_and_median_step_per_thread_count():
    rounds = [
        [timing("1", 10.123456, 2.12345, {}), timing("1", 6.0, 3.0, {}, workers=2)],
        [timing("1", 12.0, 2.0, {}), timing("1", 5.555555, 4.0, {}, workers=2)],
        [timing("1", 11.0, 1.0, {}), timing("1", 7.0, 3.5, {}, workers=2)],
    ]
    assert transformer.rounds_summary(rounds) == {
        "1_threads_1_workers": {"best_step_ms": 10.12, "median_step_ms": 11.0,
                                "median_ratio_to_matmul": 2.0},
        "1_threads_2_workers": {"best_step_ms": 5.56, "median_step_ms": 6.0,
                                "median_ratio_to_matmul": 3.5},
    }
    two = transformer.rounds_summary(rounds[:2])["1_threads_1_workers"]
    assert two == {"best_step_ms": 10.12, "median_step_ms": 11.06,
                   "median_ratio_to_matmul": 2.062}


def test_bench_report_lays_out_the_summary_layers_and_memory():
    timings = [
        timing("1", 40.25, 2.5, {"embedding": 1.0, "h.0.attn": 3.0}),
        timing("1", 25.0, 3.25, {"embedding": 2.0, "h.0.attn": 2.0}, workers=2),
    ]
    memory = [
        {"block_size": 32, "kept_per_token": 2048.0, "peak_per_token": 5120.0},
        {"block_size": 256, "kept_per_token": 102400.0, "peak_per_token": 204800.0},
    ]
    assert transformer.bench_report(timings, memory).split("\n") == [
        "GPT: 4 layers, 4 heads, n_embd 128, block 64, batch 12, vocab 65, float32; "
        "789,760 parameters, 1.23 GFLOP a step",
        " threads workers  fwd+bwd ms  tokens/s  GFLOP/s  matmul GFLOP/s  x matmul",
        "       1       1        40.2    12,346      7.9            45.7      2.50",
        "       1       2        25.0    12,346      7.9            45.7      3.25",
        "per piece, ms per step (share of the step), threads x workers;",
        "with workers, the pieces of one of them:",
        "                             1 x 1           1 x 2",
        "         embedding     1.00 ( 25%)     2.00 ( 50%)",
        "          h.0.attn     3.00 ( 75%)     2.00 ( 50%)",
        "memory per token, KiB: kept for the backward pass / step's peak",
        "  block    32:      2.0 /      5.0",
        "  block   256:    100.0 /    200.0",
    ]
    assert "memory" not in transformer.bench_report(timings, [])


@pytest.fixture
def fake_bench(monkeypatch):
    """``gpt bench`` with its measurements replaced: what the command does with them."""
    clock = FakeClock()
    clock.advance(100.0)  # a clock's zero is arbitrary
    monkeypatch.setattr(transformer, "time", clock)
    calls = {"threads": [], "memory": []}
    steps = iter([10.0, 12.0, 11.0, 9.0, 8.0])

    def benchmark_threads(threads, workers, **options):
        calls["threads"].append((threads, workers, options))
        clock.advance(2.0)
        return [timing(str(n), next(steps), 2.0, {"embedding": 1.0}, workers=w)
                for n in threads for w in workers]

    def activation_memory(batch):
        calls["memory"].append(batch)
        return [{"block_size": 32, "kept_per_token": 1024.0, "peak_per_token": 2048.0}]

    monkeypatch.setattr(transformer, "benchmark_threads", benchmark_threads)
    monkeypatch.setattr(transformer, "activation_memory", activation_memory)
    return calls


def test_bench_command_defaults(fake_bench, capsys):
    from scratchlm.cli import main

    assert main(["gpt", "bench"]) == 0
    assert fake_bench["threads"] == [([1, 2], [1, 2], {"batch": 12, "repeat": 20})]
    assert fake_bench["memory"] == [12]
    out = capsys.readouterr().out
    assert out.startswith("GPT: 4 layers") and "over " not in out
    assert out.rstrip("\n").endswith("  block    32:      1.0 /      2.0")


def test_bench_command_rounds_record_and_json(fake_bench, capsys, tmp_path):
    from scratchlm.cli import main

    path = tmp_path / "bench.json"
    argv = ["gpt", "bench", "--threads", "1,3", "--workers", "1", "--batch", "2",
            "--repeat", "4", "--rounds", "2", "--record", str(path)]
    assert main(argv) == 0
    assert fake_bench["threads"] == [([1, 3], [1], {"batch": 2, "repeat": 4})] * 2
    assert fake_bench["memory"] == [2]
    rounds = [[timing("1", 10.0, 2.0, {"embedding": 1.0}),
               timing("3", 12.0, 2.0, {"embedding": 1.0})],
              [timing("1", 11.0, 2.0, {"embedding": 1.0}),
               timing("3", 9.0, 2.0, {"embedding": 1.0})]]
    record = read_record(path)
    assert record["config"] == {"model": transformer.BENCH_CONFIG.to_dict(), "batch": 2,
                                "repeat": 4, "rounds": 2, "threads": [1, 3],
                                "workers": [1]}
    assert record["metrics"] == transformer.rounds_summary(rounds)
    assert record["curves"] == {"rounds": rounds}
    assert record["elapsed_seconds"] == 4.0  # both rounds, on the fake clock
    assert record["command"].startswith("python -m scratchlm")
    out = capsys.readouterr().out.rstrip("\n").split("\n")
    summary = transformer.rounds_summary(rounds)
    expected = [f"over 2 rounds, {key}: {value}" for key, value in summary.items()]
    assert out[-2:] == expected
    argv = ["gpt", "bench", "--threads", "1", "--workers", "1", "--json", "--no-memory"]
    assert main(argv) == 0
    assert fake_bench["memory"] == [2]  # --no-memory: not measured
    printed = json.loads(capsys.readouterr().out)
    timings = [timing("1", 8.0, 2.0, {"embedding": 1.0})]
    assert printed == {"timings": timings, "memory": []}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "0"], "--threads must be positive integers like 1,2, got '0'"),
        (["--threads", "2,0"], "got '2,0'"),
        (["--threads", "a,b"], "got 'a,b'"),
        (["--threads", ""], "got ''"),
        (["--workers", "0"], "--workers must be positive integers like 1,2, got '0'"),
        (["--workers", "1,x"], "got '1,x'"),
        (["--batch", "0"], "--batch must be positive, got 0"),
        (["--repeat", "-1"], "--repeat must be positive, got -1"),
        (["--rounds", "0"], "--rounds must be positive, got 0"),
    ],
)
def test_bench_command_refuses_bad_values_before_timing_anything(
    fake_bench, capsys, args, message
):
    from scratchlm.cli import main

    assert main(["gpt", "bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert fake_bench == {"threads": [], "memory": []}


def test_bench_command_documents_itself_and_really_times_in_process(
    capsys, monkeypatch
):
    from conftest import assert_documented

    assert_documented("gpt")
    from scratchlm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["gpt"])  # a command is required
    assert exited.value.code == 2

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # the count this process runs with
    assert main(["gpt", "bench", "--json", "--threads", "1", "--workers", "1", "--repeat",
                 "1", "--batch", "1", "--no-memory"]) == 0
    (measured,) = json.loads(capsys.readouterr().out)["timings"]
    assert measured["n_params"] == count_params(transformer.BENCH_CONFIG)
    assert measured["step_ms"] > 0 and measured["ratio_to_matmul"] > 0
    per_second = 64 / measured["step_ms"] * 1e3
    assert measured["tokens_per_second"] == pytest.approx(per_second)
    layers = measured["layers_ms"]
    assert len(layers) == 1 + 4 * 5 + 2
    assert all(math.isfinite(value) for value in layers.values())


# --- data parallelism: replicas that share the parameters and split the batch ---------


def gradients_of(model, step):
    model.zero_grads()
    loss = step()
    return loss, {name: grad.copy() for name, grad in model.grads.items()}


def one_model_step(model, ids, targets):
    def step():
        _, loss = model.forward(ids, targets)
        model.backward()
        return loss

    return step


@pytest.mark.parametrize("workers, batch", [(2, 5), (3, 7), (4, 2), (1, 3)])
def test_data_parallel_gives_one_models_loss_and_gradient(workers, batch):
    config = tiny_config(dtype="float64")
    model = GPT(config, rng=rng(20))
    ids, targets = ids_and_targets(config, batch=batch, seed=21)
    targets[0, :-1] = IGNORE  # unequal shares of counted targets
    if batch > 2:
        targets[2] = IGNORE  # and one sequence that counts for nothing at all
    loss, expected = gradients_of(model, one_model_step(model, ids, targets))
    parallel = DataParallel(model, workers)
    assert len(parallel.replicas) == workers and parallel.replicas[0] is model
    parallel_loss, grads = gradients_of(
        model, lambda: parallel.forward_backward(ids, targets)
    )
    assert parallel_loss == pytest.approx(loss, rel=1e-13)
    for name, grad in expected.items():
        np.testing.assert_allclose(grads[name], grad, rtol=1e-11, atol=1e-15)
    if batch > workers:  # then a smaller batch: replicas left idle add nothing stale
        small_ids, small_targets = ids[:2], targets[:2]
        _, small = gradients_of(model, one_model_step(model, small_ids, small_targets))
        _, shared_small = gradients_of(
            model, lambda: parallel.forward_backward(small_ids, small_targets)
        )
        for name, grad in small.items():
            np.testing.assert_allclose(shared_small[name], grad, rtol=1e-11, atol=1e-15)
    model.zero_grads()
    model.grads["wte.weight"] += 1.0  # it adds into the model's grads, as backward does
    parallel.forward_backward(ids, targets)
    np.testing.assert_allclose(model.grads["wte.weight"], expected["wte.weight"] + 1.0,
                               rtol=1e-11)


def test_data_parallel_is_deterministic_in_float32():
    config = tiny_config()
    model = GPT(config, rng=rng(22))
    ids, targets = ids_and_targets(config, batch=6, seed=23)
    parallel = DataParallel(model, 3)
    first = gradients_of(model, lambda: parallel.forward_backward(ids, targets))
    for _ in range(3):
        again = gradients_of(model, lambda: parallel.forward_backward(ids, targets))
        assert again[0] == first[0]
        for name, grad in first[1].items():
            np.testing.assert_array_equal(again[1][name], grad)
            assert grad.dtype == np.float32


def test_replicas_share_the_parameters_but_not_the_gradients():
    config = tiny_config(dtype="float64")
    model = GPT(config, rng=rng(24))
    parallel = DataParallel(model, 2)
    replica = parallel.replicas[1]
    for name, param in model.params.items():
        assert replica.params[name] is param  # an in-place update reaches both
        assert replica.grads[name] is not model.grads[name]
    for block, twin in zip(model.blocks, replica.blocks):
        assert twin.attn.qkv.params["weight"] is block.attn.qkv.params["weight"]
        assert twin.mlp is not block.mlp
    model.params["wte.weight"] *= 2.0  # what an optimizer step does, in place
    ids, targets = ids_and_targets(config, batch=2, seed=25)
    loss, expected = gradients_of(model, one_model_step(model, ids, targets))
    assert parallel.forward_backward(ids, targets) == pytest.approx(loss, rel=1e-13)


@pytest.mark.parametrize(
    "workers, ids, targets, message",
    [
        (0, None, None, "workers must be positive, got 0"),
        (2, np.zeros((2, 3), int), np.zeros((2, 2), int),
         "targets must have the shape of ids (2, 3), got (2, 2)"),
        (2, np.zeros((2, 3), int), np.full((2, 3), IGNORE),
         "every target is ignored"),
        (2, np.zeros((2, 9), int), np.zeros((2, 9), int), "does not fit"),
        (2, np.array([[0, 1], [2, 99]]), np.zeros((2, 2), int), "id 99 is out of range"),
    ],
)
def test_data_parallel_bad_input_is_one_clear_error(workers, ids, targets, message):
    model = GPT(tiny_config(), rng=rng(26))
    with pytest.raises(ScratchLMError, match=re.escape(message)):
        DataParallel(model, workers).forward_backward(ids, targets)


def test_the_pytorch_reference_record_summarises_its_own_rounds():
    """The record Chapter 5 compares against: PyTorch and our two-core settings, timed
    in turn; its summary must be what its rounds say (the script needs PyTorch, which
    the tests do not have, so the record is checked instead)."""
    root = Path(__file__).resolve().parents[1]
    record = read_record(root / "book/_runs/pytorch_reference.json")
    rounds, metrics = record["curves"]["rounds"], record["metrics"]
    assert len(rounds) == record["config"]["rounds"] >= 5
    assert record["config"]["model"] == transformer.BENCH_CONFIG.to_dict()
    assert metrics["torch"].startswith("2.")
    settings = ["1_threads_2_workers", "2_threads_1_workers"]
    for key in ["pytorch", *settings]:
        steps = [row[key] for row in rounds]
        assert metrics[f"median_{key}_ms"] == round(float(np.median(steps)), 2)
    for key in settings:
        ratios = [row[key] / row["pytorch"] for row in rounds]
        assert metrics[f"median_ratio_{key}"] == round(float(np.median(ratios)), 3)
