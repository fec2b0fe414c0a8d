"""Chapter 5: LayerNorm, GELU, the MLP, the pre-LN block and the GPT with its tied head."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.gradcheck import check_gradients, check_layer
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
        (np.zeros((1, 4), dtype=np.int64), "shape"),
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
    with pytest.raises(ScratchLMError, match="JSON object"):
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
    done = run_cli("bench", "--json", "--threads", "1", "--repeat", "1", "--batch", "2",
                   "--no-memory")
    assert done.returncode == 0, done.stderr
    (timing,) = json.loads(done.stdout)["timings"]
    assert timing["threads"] == "1" and timing["config"]["n_layer"] == 4
    assert timing["ratio_to_matmul"] > 0 and timing["tokens_per_second"] > 0
    assert {"embedding", "h.3.mlp", "ln_f + head", "loss and the rest"} <= set(timing["layers_ms"])


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads", "a,b"], ["--repeat", "0"]])
def test_bench_command_bad_value_is_one_line_and_status_2(args):
    done = run_cli("bench", *args)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
