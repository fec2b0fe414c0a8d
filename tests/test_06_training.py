"""Chapter 6: AdamW, schedule, clipping, accumulation, checkpoints, resume, records."""

import dataclasses
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_data

from scratchlm import files, transformer
from scratchlm.bpe import BPETokenizer
from scratchlm.chars import CharTokenizer
from scratchlm.cli import main
from scratchlm.data import corpus, train_val_split
from scratchlm.errors import ScratchLMError
from scratchlm.files import load_arrays, save_arrays
from scratchlm.optim import AdamW, clip_grad_norm, learning_rate
from scratchlm.runs import read_record
from scratchlm.train import (
    CHECKPOINT_KIND,
    MODEL_KIND,
    TokenData,
    TrainConfig,
    bits_per_byte,
    cached_tokens,
    char_models,
    estimate_loss,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
    sequence_nll,
    start_state,
    text_data,
    token_data,
    train,
    train_step,
    truncated,
)
from scratchlm.transformer import GPT, IGNORE, GPTConfig, cross_entropy

TINY = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "block_size": 16,
    "batch_size": 4,
    "eval_iters": 2,
    "learning_rate": 3e-3,
    "warmup_iters": 5,
    "lr_decay_iters": 60,
}


@pytest.fixture(autouse=True, scope="module")
def token_cache(tmp_path_factory):
    """Token files go to a private cache, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


def tiny_config(out_dir, **overrides) -> TrainConfig:
    settings = {
        **TINY,
        "max_iters": 30,
        "eval_interval": 10,
        "log_interval": 5,
        "checkpoint_interval": 10,
        "out_dir": str(out_dir),
        **overrides,
    }
    return TrainConfig.from_dict(settings)


def shakespeare():
    require_data("tinyshakespeare/input.txt")
    return text_data("tinyshakespeare", "char")


# --- AdamW, the schedule, clipping ----------------------------------------------------


def test_adamw_matches_an_update_computed_by_hand():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((3, 2)), rng.standard_normal(2)
    params = {"weight": weight.copy(), "bias": bias.copy()}
    optimizer = AdamW(params, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    m = {name: 0.0 for name in params}
    v = {name: 0.0 for name in params}
    expected = {"weight": weight.copy(), "bias": bias.copy()}
    for t, lr in enumerate([0.01, 0.02, 0.015], start=1):
        grads = {name: rng.standard_normal(p.shape) for name, p in params.items()}
        optimizer.step(grads, lr)
        for name, p in expected.items():
            m[name] = 0.9 * m[name] + 0.1 * grads[name]
            v[name] = 0.99 * v[name] + 0.01 * grads[name] ** 2
            m_hat, v_hat = m[name] / (1 - 0.9**t), v[name] / (1 - 0.99**t)
            decay = 0.1 if name == "weight" else 0.0  # matrices only
            expected[name] = p * (1 - lr * decay) - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        for name in params:
            np.testing.assert_allclose(
                params[name], expected[name], rtol=1e-12, atol=1e-15
            )


def test_first_adam_step_moves_every_entry_by_the_learning_rate():
    """With bias correction, step 1 moves each entry by lr * sign(g), whatever g is."""
    params = {"w": np.zeros((4, 4))}
    grads = {"w": np.random.default_rng(1).standard_normal((4, 4)) * 1e-3}
    AdamW(params, betas=(0.9, 0.999), eps=0.0).step(grads, 0.05)
    np.testing.assert_allclose(params["w"], -0.05 * np.sign(grads["w"]), rtol=1e-12)


def test_weight_decay_touches_matrices_only():
    params = {"matrix": np.ones((2, 3)), "gain": np.ones(3)}
    zero = {name: np.zeros_like(p) for name, p in params.items()}
    AdamW(params, weight_decay=0.5).step(zero, 0.1)
    np.testing.assert_allclose(params["matrix"], 0.95)
    np.testing.assert_array_equal(params["gain"], 1.0)


def test_the_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    def lr(step):
        return learning_rate(step, max_lr=1.0, min_lr=0.1, warmup=10, decay_steps=110)

    assert lr(0) == pytest.approx(1 / 11)
    assert [lr(s) for s in range(10)] == pytest.approx(
        [(s + 1) / 11 for s in range(10)]
    )
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # half way down the cosine
    assert lr(110) == lr(500) == pytest.approx(0.1)
    after = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_clipping_scales_every_gradient_by_one_factor_and_returns_the_norm_before():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-6)
    small = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])
    off = {"a": np.array([30.0, 40.0])}
    assert clip_grad_norm(off, 0.0) == pytest.approx(50.0)
    np.testing.assert_array_equal(off["a"], [30.0, 40.0])


# --- one step: gradient accumulation --------------------------------------------------


def captured_gradient(state, data, config):
    """The gradient ``train_step`` hands to the optimizer (and the loss it reports)."""
    seen = {}
    state.optimizer.step = lambda grads, lr: seen.update(
        {name: grad.copy() for name, grad in grads.items()}
    )
    loss, _, _ = train_step(state, data, config)
    return loss, seen


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-9), ("float32", 2e-4)])
def test_gradient_accumulation_equals_the_big_batch(masked, dtype, rtol):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, size=500).astype(np.uint16)
    mask = rng.random(500) < 0.3 if masked else None  # micro-batches count differently
    data = TokenData(ids, ids, mask, mask)
    config = TrainConfig.from_dict(
        {**TINY, "dtype": dtype, "grad_clip": 0.0, "batch_size": 2, "grad_accum": 4}
    )
    state = start_state(config, 11)
    batch_rng = np.random.default_rng()
    batch_rng.bit_generator.state = state.rng.bit_generator.state  # the same batches
    loss, accumulated = captured_gradient(state, data, config)

    micro = [data.batch("train", 2, config.block_size, batch_rng) for _ in range(4)]
    counts = [int((targets != IGNORE).sum()) for _, targets in micro]
    assert not masked or len(set(counts)) > 1
    big = start_state(config, 11).model
    big.zero_grads()
    _, big_loss = big.forward(
        np.concatenate([i for i, _ in micro]), np.concatenate([t for _, t in micro])
    )
    big.backward()
    assert loss == pytest.approx(big_loss, rel=rtol)
    for name, grad in big.grads.items():
        scale = np.abs(grad).max()
        np.testing.assert_allclose(accumulated[name], grad, rtol=0, atol=rtol * scale)


# --- data -----------------------------------------------------------------------------


def test_batches_are_seeded_windows_and_masked_targets_are_ignored():
    ids = np.arange(100, dtype=np.uint16)
    mask = ids % 2 == 0
    data = TokenData(ids, ids, mask, None)
    inputs, targets = data.batch("train", 3, 5, np.random.default_rng(7))
    again, _ = data.batch("train", 3, 5, np.random.default_rng(7))
    np.testing.assert_array_equal(inputs, again)
    assert inputs.dtype == targets.dtype == np.int64 and inputs.shape == (3, 5)
    assert np.all(np.where(targets % 2 == 0, targets == inputs + 1, targets == IGNORE))
    with pytest.raises(ScratchLMError, match="too short"):
        TokenData(ids[:5], ids).batch("train", 1, 5, np.random.default_rng(0))


def test_token_files_are_cached_and_read_back_by_memmap():
    tokenizer = CharTokenizer("abc ")
    first = cached_tokens(tokenizer, "abc cab")
    second = cached_tokens(tokenizer, "abc cab")
    assert isinstance(second, np.memmap) and second.dtype == np.uint16
    np.testing.assert_array_equal(first, tokenizer.encode("abc cab"))
    assert first.filename == second.filename


def test_a_truncated_bpe_tokenizer_is_the_shorter_training():
    text = (
        "It was a bright cold day in April, and the clocks were striking thirteen. "
        "Happy families are all alike; every unhappy family is unhappy in its own way. "
        "In my younger and more vulnerable years my father gave me some advice. "
    ) * 5
    long, short = BPETokenizer.train(text, 320), BPETokenizer.train(text, 290)
    assert len(long.merges) == 320 - 260
    assert truncated(long, 290).merges == short.merges
    with pytest.raises(ScratchLMError, match="vocab_size"):
        truncated(long, 100)


# --- measuring in bits per byte -------------------------------------------------------


def test_a_uniform_model_scores_log2_of_its_vocabulary_per_character():
    model = GPT(GPTConfig(7, 4, 1, 1, 4), rng=np.random.default_rng(0))
    for param in model.params.values():
        param[...] = 0.0  # every logit 0: a uniform prediction
    tokenizer = CharTokenizer("abcdefg")
    text = "abcdefgabcdefgabc"  # 17 characters: four full windows and a tail of 0
    ids = tokenizer.encode(text)
    assert sequence_nll(model, ids) == pytest.approx((len(ids) - 1) * math.log(7))
    assert bits_per_byte(model, tokenizer, text[:-2]) == pytest.approx(math.log2(7))


# --- the loop, checkpoints and resume -------------------------------------------------


def test_resuming_in_process_continues_bit_for_bit(tmp_path):
    tokenizer, data = shakespeare()
    whole, _ = train(
        tiny_config(tmp_path / "whole"), data, tokenizer, log=io.StringIO()
    )
    half = tiny_config(tmp_path / "half", max_iters=15, checkpoint_interval=5)
    train(half, data, tokenizer, log=io.StringIO())
    resumed = tiny_config(tmp_path / "half", checkpoint_interval=5)
    with pytest.raises(ScratchLMError, match="checkpoint_interval"):
        train(tiny_config(tmp_path / "half"), data, tokenizer, resume=True)
    model, curves = train(resumed, data, tokenizer, resume=True, log=io.StringIO())
    for name, param in whole.params.items():
        np.testing.assert_array_equal(param, model.params[name])


def tiny_settings(out_dir, max_iters=240) -> dict:
    """A run small enough to start as a process many times: logs every step."""
    return {
        **TINY,
        "max_iters": max_iters,
        "lr_decay_iters": max_iters,
        "eval_interval": 40,
        "log_interval": 1,
        "checkpoint_interval": 7,
        "out_dir": str(out_dir),
    }


def tiny_flags(out_dir, max_iters=240) -> list[str]:
    """The same run as command-line flags."""
    return [f"--{k}={v}" for k, v in tiny_settings(out_dir, max_iters).items()]


def cli_env(tmp_path) -> dict:
    return {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT / "src"),
    }


def run_cli(args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        cwd=ROOT,
        timeout=300,
    )


def interrupt_at(args, tmp_path, at_step: int, how: int, delay: float) -> int:
    """Start a run; once it logs ``at_step``, wait ``delay`` s and send ``how``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=cli_env(tmp_path),
        cwd=ROOT,
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("step") and f" {at_step}/" in line:
            break
    time.sleep(delay)
    process.send_signal(how)
    lines.append(process.stderr.read())
    code = process.wait(timeout=60)
    if code not in (-signal.SIGKILL, 130):
        print("".join(lines[-5:]))  # shown by pytest if the test fails
    return code


def model_arrays(path) -> dict:
    arrays, _ = load_arrays(path, MODEL_KIND)
    return arrays


def test_a_run_killed_at_any_moment_resumes_to_bit_identical_weights(tmp_path):
    require_data("tinyshakespeare/input.txt")
    reference = run_cli(["train", *tiny_flags(tmp_path / "reference")], tmp_path)
    assert reference.returncode == 0, reference.stderr
    moments = random.Random(6)  # fixed, so that a failure can be replayed
    victim = tiny_flags(tmp_path / "victim")
    first = moments.randrange(10, 120)
    for kill, at_step in enumerate([first, moments.randrange(first + 10, 230)]):
        code = interrupt_at(
            ["train", *victim] + (["--resume"] if kill else []),
            tmp_path,
            at_step,
            signal.SIGKILL,
            moments.uniform(0.0, 0.05),
        )
        assert code == -signal.SIGKILL, f"the run ended ({code}) before the kill"
    resumed = run_cli(["train", *victim, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected = model_arrays(tmp_path / "reference" / "model.npz")
    got = model_arrays(tmp_path / "victim" / "model.npz")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    ref_json, got_json = (json.loads(r.stdout) for r in (reference, resumed))
    assert got_json["final_val_loss"] == ref_json["final_val_loss"]


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_continue(tmp_path):
    require_data("tinyshakespeare/input.txt")
    args = tiny_flags(tmp_path / "run", max_iters=400)
    code = interrupt_at(["train", *args], tmp_path, 30, signal.SIGINT, 0.0)
    assert code == 130
    _, header = load_arrays(tmp_path / "run" / "checkpoint.npz", CHECKPOINT_KIND)
    assert header["step"] >= 30
    resumed = run_cli(["train", *args, "--resume", "--max_iters=60"], tmp_path)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr


def test_resume_without_a_checkpoint_is_one_line(tmp_path):
    result = run_cli(["train", *tiny_flags(tmp_path / "none"), "--resume"], tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip().count("\n") == 0 and "nothing to resume" in result.stderr
    )


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(
    tmp_path, monkeypatch
):
    tokenizer, data = shakespeare()
    config = tiny_config(tmp_path, max_iters=10)
    train(config, data, tokenizer, log=io.StringIO())
    path = tmp_path / "checkpoint.npz"
    before = path.read_bytes()
    state = load_checkpoint(path, config, tokenizer)

    def power_cut(fd):
        raise OSError("simulated crash in the middle of a write")

    monkeypatch.setattr(files.os, "fsync", power_cut)
    state.step += 5
    with pytest.raises(OSError):
        save_checkpoint(path, state, tokenizer, config)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))  # and no half-written file is left behind
    assert load_checkpoint(path, config, tokenizer).step == 10


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_stops_naming_it_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, what
):
    """Step 12 (the 17th loss, after 4 for the evaluation at step 0) goes bad."""
    tokenizer, data = shakespeare()
    config = tiny_config(
        tmp_path, max_iters=40, checkpoint_interval=5, eval_interval=100
    )
    calls = []

    def poisoned(logits, targets):
        loss, dlogits = cross_entropy(logits, targets)
        calls.append(1)
        if len(calls) == 4 + 13:
            return (math.nan, dlogits) if what == "loss" else (loss, dlogits * math.inf)
        return loss, dlogits

    monkeypatch.setattr(transformer, "cross_entropy", poisoned)
    with pytest.raises(ScratchLMError) as caught:
        train(config, data, tokenizer, log=io.StringIO())
    message = str(caught.value)
    assert "\n" not in message and "at step 12 is" in message
    assert message.startswith("the loss" if what == "loss" else "the gradient norm")
    assert "kept the checkpoint of step 10" in message
    kept = load_checkpoint(tmp_path / "checkpoint.npz", config, tokenizer)
    assert kept.step == 10
    assert all(np.isfinite(p).all() for p in kept.model.params.values())


# --- damaged and foreign files --------------------------------------------------------


def small_model_file(tmp_path) -> Path:
    model = GPT(GPTConfig(5, 4, 1, 1, 4), rng=np.random.default_rng(0))
    path = tmp_path / "model.npz"
    save_model(path, model, CharTokenizer("abcde"))
    return path


def damage(path: Path, how: str) -> Path:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupted":
        middle = len(data) // 2
        path.write_bytes(
            data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        )
    elif how == "foreign":
        save_arrays(path, "word2vec", {"vectors": np.zeros((3, 2))})
    elif how == "not-ours":
        path.write_bytes(b"#!/bin/sh\necho hello\n")
    elif how == "wrong-shape":
        arrays, header = load_arrays(path, MODEL_KIND)
        arrays["wte.weight"] = arrays["wte.weight"][:, :2].copy()
        save_arrays(
            path, MODEL_KIND, arrays, {k: header[k] for k in ("config", "tokenizer")}
        )
    return path


HOW = ["truncated", "corrupted", "foreign", "not-ours", "wrong-shape"]


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_model_file_is_a_one_line_error(tmp_path, how):
    path = damage(small_model_file(tmp_path), how)
    with pytest.raises(ScratchLMError) as caught:
        load_model(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_checkpoint_is_a_one_line_error_and_exit_status_2(
    tmp_path, how, capsys
):
    tokenizer, data = shakespeare()
    config = TrainConfig.from_dict(tiny_settings(tmp_path / "run", max_iters=7))
    train(config, data, tokenizer, log=io.StringIO())
    flags = tiny_flags(tmp_path / "run", max_iters=7)
    checkpoint = tmp_path / "run" / "checkpoint.npz"
    if how == "wrong-shape":
        arrays, header = load_arrays(checkpoint, CHECKPOINT_KIND)
        arrays["v/wpe.weight"] = arrays["v/wpe.weight"][:3].copy()
        save_arrays(checkpoint, CHECKPOINT_KIND, arrays, header)
    else:
        damage(checkpoint, how)
    args = ["train", *flags, "--max_iters=14", "--resume"]
    if how == "truncated":  # once end to end, in a process of its own
        result = run_cli(args, tmp_path)
        code, stderr = result.returncode, result.stderr
    else:  # the same code path as `python -m scratchlm`, without starting Python
        code, stderr = main(args), capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1


@pytest.mark.parametrize(
    "name, change, wrong",
    [
        ("wte.weight", lambda a: a[:, :2].copy(), "float32[5, 2]"),  # config says n_embd 4
        ("ln_f.weight", lambda a: a.astype(np.float64), "float64[4]"),
        ("m/wte.weight", lambda a: np.zeros_like(a), "unexpected tensor"),  # a model file has no moments
    ],
)
def test_a_model_file_whose_arrays_disagree_with_its_config_is_refused(tmp_path, name, change, wrong):
    path = small_model_file(tmp_path)
    arrays, header = load_arrays(path, MODEL_KIND)
    arrays[name] = change(arrays[name.removeprefix("m/")])
    save_arrays(path, MODEL_KIND, arrays, {k: header[k] for k in ("config", "tokenizer")})
    with pytest.raises(ScratchLMError) as caught:
        load_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and repr(name) in message and wrong in message


@pytest.mark.parametrize(
    "name, change, wrong",
    [
        ("v/wpe.weight", lambda a: a[:3].copy(), "float32[3, 16]"),  # a moment cut short
        ("m/lm_head", lambda a: a, "unexpected tensor"),  # a moment of no parameter
        ("m/h.0.ln_1.bias", lambda a: a.astype(np.float64), "float64[16]"),
    ],
)
def test_a_checkpoint_whose_moments_disagree_with_its_parameters_is_refused(tmp_path, name, change, wrong):
    tokenizer, config = CharTokenizer("abcde"), tiny_config(tmp_path)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, start_state(config, tokenizer.vocab_size), tokenizer, config)
    arrays, header = load_arrays(path, CHECKPOINT_KIND)
    arrays[name] = change(arrays.get(name, arrays["m/wpe.weight"]))
    save_arrays(path, CHECKPOINT_KIND, arrays, header)
    for load in (lambda: load_checkpoint(path, config, tokenizer), lambda: load_model(path)):
        with pytest.raises(ScratchLMError) as caught:
            load()
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and repr(name) in message and wrong in message


def test_a_checkpoint_from_another_run_is_refused(tmp_path):
    tokenizer, data = shakespeare()
    train(tiny_config(tmp_path, max_iters=5), data, tokenizer, log=io.StringIO())
    with pytest.raises(ScratchLMError, match="n_embd = 16, this run has 32"):
        load_checkpoint(
            tmp_path / "checkpoint.npz", tiny_config(tmp_path, n_embd=32), tokenizer
        )
    with pytest.raises(ScratchLMError, match="another tokenizer"):
        load_checkpoint(
            tmp_path / "checkpoint.npz",
            tiny_config(tmp_path, max_iters=5),
            CharTokenizer("".join(sorted(set(tokenizer.alphabet) - {"z"}))),
        )


def test_init_from_a_damaged_model_exits_2_without_a_traceback(tmp_path):
    path = damage(small_model_file(tmp_path), "truncated")
    result = run_cli(["train", f"--init_from={path}", "--max_iters=1"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


# --- configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("n_layers = 4\n", "unknown setting 'n_layers'"),
        ("n_layer = 4.5\n", "n_layer must be a int, got 4.5"),
        ("bias = 1\n", "bias must be a bool"),
        ("n_layer = \n", "not valid TOML"),
        ("warmup_iters = -1\n", "warmup_iters must be at least 0"),
        ("beta2 = 1.0\n", "beta2 must be in"),
        ('save_dtype = "bfloat16"\n', "save_dtype must be 'float16' or empty"),
    ],
)
def test_config_errors_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScratchLMError, match=message.replace("(", r"\(")) as caught:
        TrainConfig.from_toml(path)
    assert "\n" not in str(caught.value)
    assert main(["train", f"--config={path}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_float16_model_file_is_half_the_size_and_loads_back_widened(tmp_path):
    model = GPT(GPTConfig(5, 8, 2, 2, 32), rng=np.random.default_rng(0))
    full, half = tmp_path / "full.npz", tmp_path / "half.npz"
    save_model(full, model, CharTokenizer("abcde"))
    save_model(half, model, CharTokenizer("abcde"), store_dtype="float16")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _, header = load_model(half)
    assert header["stored_dtype"] == "float16"
    for name, param in model.params.items():
        assert loaded.params[name].dtype == np.float32
        np.testing.assert_array_equal(
            loaded.params[name], param.astype(np.float16).astype(np.float32)
        )
    arrays, header = load_arrays(half, MODEL_KIND)  # float32 arrays under a float16 header
    save_arrays(half, MODEL_KIND, {**arrays, "wte.weight": arrays["wte.weight"]
                                   .astype(np.float32)}, {**header})
    with pytest.raises(ScratchLMError, match=r"tensor 'wte.weight' should be float16"):
        load_model(half)
    save_arrays(half, MODEL_KIND, arrays, {**header, "stored_dtype": "int8"})
    with pytest.raises(ScratchLMError, match="unknown stored_dtype 'int8'"):
        load_model(half)


def test_the_committed_comparison_model_is_stored_in_float16():
    path = ROOT / "book/_runs/chat_scratch.npz"
    model, _, header = load_model(path)
    assert header["stored_dtype"] == "float16"
    assert header["train_config"]["save_dtype"] == "float16"
    assert model.params["wte.weight"].dtype == np.float32


def test_every_committed_config_loads():
    for path in sorted((ROOT / "book/configs").glob("*.toml")):
        TrainConfig.from_toml(path)


# --- the records replay ---------------------------------------------------------------


def present(record_path: Path) -> dict:
    """A committed record, or skip (fail under CI=true, where all must exist)."""
    if not record_path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{record_path.name} is missing")
        pytest.skip(f"{record_path.name} does not exist yet (its run is long)")
    return read_record(record_path)


def replay(record_path: Path, *, train_split: bool):
    """Re-run a training record's first logged steps; compare with what it logged."""
    record = present(record_path)
    config = TrainConfig.from_dict(record["config"])
    tokenizer_name = config.tokenizer
    if tokenizer_name != "char":
        tokenizer_name = str(ROOT / tokenizer_name)
    tokenizer, data = text_data(config.corpus, tokenizer_name)
    state = start_state(config, tokenizer.vocab_size)
    curves = record["curves"]
    splits = ("train", "val") if train_split else ("val",)
    losses = estimate_loss(state.model, data, config, splits)
    for _ in range(curves["log_step"][0]):
        loss, norm, lr = train_step(state, data, config)
    assert losses["val"] == pytest.approx(curves["val_loss"][0], rel=1e-4)
    if train_split:
        assert losses["train"] == pytest.approx(curves["train_loss"][0], rel=1e-4)
    assert loss == pytest.approx(curves["log_loss"][0], rel=1e-4)
    assert norm == pytest.approx(curves["grad_norm"][0], rel=1e-3)
    assert lr == pytest.approx(curves["lr"][0], rel=1e-12)


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare_char_seed1338"])
def test_the_shakespeare_records_replay(name):
    require_data("tinyshakespeare/input.txt")
    replay(ROOT / f"book/_runs/{name}.json", train_split=True)


def test_the_base_model_record_replays():
    require_data("dostoevsky/the_idiot.txt")
    replay(ROOT / "book/_runs/dostoevsky_base.json", train_split=False)


def test_the_sweep_record_replays_its_smallest_point():
    require_data("dostoevsky/the_idiot.txt")
    record = present(ROOT / "book/_runs/sweep.json")
    base = TrainConfig.from_dict(record["config"]["base"])
    point = min(
        record["metrics"]["points"], key=lambda p: p["n_params"]
    )  # the cheapest
    tokenizer = truncated(BPETokenizer.load(ROOT / base.tokenizer), point["vocab_size"])
    shape = {k: point[k] for k in ("n_layer", "n_head", "n_embd") if k in point}
    config = dataclasses.replace(base, **shape)
    data = token_data(tokenizer, corpus(base.corpus))
    state = start_state(config, tokenizer.vocab_size)
    for _ in range(config.log_interval):
        loss, _, _ = train_step(state, data, config)
    assert loss == pytest.approx(point["first_log_loss"], rel=1e-4)


def test_the_scoreboard_record_replays_its_bigram():
    require_data("dostoevsky/the_idiot.txt", "dostoevsky/crime_and_punishment.txt")
    record = present(ROOT / "book/_runs/scoreboard.json")
    config = record["config"]
    train_text = train_val_split(corpus(config["train_corpus"]))[0]
    models = char_models(train_text, corpus(config["held_out"]), config["attention"])
    _, _, _, bits = models["bigram"][1]()
    recorded = {entry["name"]: entry for entry in record["metrics"]["entries"]}
    assert bits == pytest.approx(recorded["bigram"]["bits_per_byte"], rel=1e-9)
    assert {"bigram", "attention", "base"} <= set(recorded)


@pytest.mark.parametrize(
    "flag", ["--gpt=nothing", "--gpt=bigram=x.npz", "--gpt==x.npz"]
)
def test_scoreboard_flags_are_checked_in_one_line(capsys, flag):
    assert main(["scoreboard", flag]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_step_gradient_depends_on_its_own_batch_only():
    """A loop that forgot to zero the gradients fails this from its second step on."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, size=500).astype(np.uint16)
    data = TokenData(ids, ids)
    config = TrainConfig.from_dict({**TINY, "dtype": "float64", "grad_clip": 0.0})
    state = start_state(config, 11)
    train_step(state, data, config)  # a first, real step
    batch_rng = np.random.default_rng()
    batch_rng.bit_generator.state = state.rng.bit_generator.state
    fresh = start_state(config, 11).model
    for name, param in fresh.params.items():
        param[...] = state.model.params[name]
    _, second = captured_gradient(state, data, config)
    fresh.zero_grads()
    fresh.forward(*data.batch("train", config.batch_size, config.block_size, batch_rng))
    fresh.backward()
    for name, grad in fresh.grads.items():
        np.testing.assert_allclose(second[name], grad, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- mutation testing (tests/MUTATION.md)


def test_adamw_defaults_neither_decay_nor_damp_small_gradients():
    from scratchlm.optim import AdamW

    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    optimizer = AdamW(params)
    optimizer.step({"w": np.zeros((2, 2)), "b": np.full(2, 1e-3)}, lr=0.1)
    np.testing.assert_array_equal(params["w"], np.ones((2, 2)))  # no weight decay unless asked
    np.testing.assert_allclose(params["b"], 0.9, rtol=1e-5)  # a tiny eps: even a small gradient moves by lr


def test_clipping_leaves_a_norm_at_the_limit_alone_and_never_overshoots():
    from scratchlm.optim import clip_grad_norm

    at_limit = {"a": np.array([0.6, 0.8])}
    assert clip_grad_norm(at_limit, 1.0) == pytest.approx(1.0)
    np.testing.assert_array_equal(at_limit["a"], [0.6, 0.8])
    big = {"a": np.array([3.0, 4.0]), "b": np.array([12.0])}
    assert clip_grad_norm(big, 1.0) == pytest.approx(13.0)
    assert math.sqrt(sum(float((g**2).sum()) for g in big.values())) <= 1.0
