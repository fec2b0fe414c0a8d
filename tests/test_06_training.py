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
from conftest import ROOT, FakeClock, require_data

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
from scratchlm.transformer import GPT, IGNORE, DataParallel, GPTConfig, cross_entropy

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


def captured_gradient(state, data, config, parallel=None):
    """The gradient ``train_step`` hands to the optimizer (and the loss it reports)."""
    seen = {}
    state.optimizer.step = lambda grads, lr: seen.update(
        {name: grad.copy() for name, grad in grads.items()}
    )
    loss, _, _ = train_step(state, data, config, parallel)
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


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-11), ("float32", 2e-4)])
def test_a_step_shared_out_among_workers_is_the_same_step(dtype, rtol):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 11, size=500).astype(np.uint16)
    mask = rng.random(500) < 0.3  # the workers' shares of targets differ
    data = TokenData(ids, ids, mask, mask)
    config = TrainConfig.from_dict(
        {**TINY, "dtype": dtype, "grad_clip": 0.0, "batch_size": 5, "grad_accum": 2}
    )
    loss, alone = captured_gradient(start_state(config, 11), data, config)
    state = start_state(config, 11)
    parallel = DataParallel(state.model, 3)
    shared_loss, shared = captured_gradient(state, data, config, parallel)
    assert shared_loss == pytest.approx(loss, rel=rtol)
    for name, grad in alone.items():
        scale = np.abs(grad).max()
        np.testing.assert_allclose(shared[name], grad, rtol=0, atol=rtol * scale)


def test_training_with_two_workers_is_deterministic_and_follows_one(tmp_path):
    ids = counting_ids()
    data, tokenizer = TokenData(ids, ids), CharTokenizer("abcdefghijk")
    runs = {}
    for name, workers in [("one", 1), ("two", 2), ("two again", 2)]:
        config = tiny_config(tmp_path / name, max_iters=12, workers=workers)
        model, curves = train(config, data, tokenizer, log=io.StringIO())
        runs[name] = (model, curves)
    (one, one_curves), (two, two_curves), (again, again_curves) = runs.values()
    assert two_curves["log_loss"] == again_curves["log_loss"]
    for name, param in two.params.items():
        np.testing.assert_array_equal(again.params[name], param)
        np.testing.assert_allclose(param, one.params[name], rtol=0, atol=1e-4)
    np.testing.assert_allclose(two_curves["log_loss"], one_curves["log_loss"], rtol=1e-4)
    # a run may go on with another number of workers: they change no setting of it
    more = tiny_config(tmp_path / "two", max_iters=14, workers=1)
    assert train(more, data, tokenizer, resume=True, log=io.StringIO())[1]["step"]
    with pytest.raises(ScratchLMError, match="workers must be at least 1, got 0"):
        tiny_config(tmp_path, workers=0)


def test_workers_run_with_one_blas_thread_each_and_the_rest_as_it_was(
    tmp_path, monkeypatch
):
    from threadpoolctl import threadpool_info, threadpool_limits

    from scratchlm import train as train_module

    real_step, seen = train_module.train_step, []

    def train_step(state, data, config, parallel):
        seen.append((config.workers, parallel is not None, blas_threads()))
        return real_step(state, data, config, parallel)

    def blas_threads():
        return {pool["num_threads"] for pool in threadpool_info()
                if pool["user_api"] == "blas"}

    monkeypatch.setattr(train_module, "train_step", train_step)
    ids = counting_ids()
    data, tokenizer = TokenData(ids, ids), CharTokenizer("abcdefghijk")
    with threadpool_limits(2, "blas"):  # as a two-core machine starts
        for workers in (2, 1):
            config = tiny_config(tmp_path / str(workers), max_iters=2, workers=workers)
            train(config, data, tokenizer, log=io.StringIO())
        assert blas_threads() == {2}  # given back when the run ends
    assert seen == [(2, True, {1})] * 2 + [(1, False, {2})] * 2


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
    parallel = DataParallel(state.model, config.workers) if config.workers > 1 else None
    for _ in range(curves["log_step"][0]):
        loss, norm, lr = train_step(state, data, config, parallel)
    assert losses["val"] == pytest.approx(curves["val_loss"][0], rel=1e-4)
    if train_split:
        assert losses["train"] == pytest.approx(curves["train_loss"][0], rel=1e-4)
    assert loss == pytest.approx(curves["log_loss"][0], rel=1e-4)
    assert norm == pytest.approx(curves["grad_norm"][0], rel=1e-3)
    assert lr == pytest.approx(curves["lr"][0], rel=1e-12)


@pytest.mark.parametrize(
    "name", ["shakespeare_char", "shakespeare_char_seed1338", "shakespeare_char_workers2"]
)
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


WORDS = "the a cat sat on mat dog ran é to big red hat".split()


def small_corpus(tmp_path, name="corpus.txt", seed=0, n_words=1500) -> Path:
    """A made-up UTF-8 text file (``corpus`` reads any file by path)."""
    draw = random.Random(seed)
    path = tmp_path / name
    path.write_text(" ".join(draw.choice(WORDS) for _ in range(n_words)) + "\n",
                    encoding="utf-8")
    return path


class RecordedData(TokenData):
    """``TokenData`` that remembers every batch it hands out."""

    def __init__(self, *arrays):
        super().__init__(*arrays)
        self.drawn = []

    def batch(self, split, batch_size, block_size, rng):
        inputs, targets = super().batch(split, batch_size, block_size, rng)
        self.drawn.append((split, inputs, targets))
        return inputs, targets


def test_the_first_ctrl_c_is_a_flag_and_the_second_stops_at_once():
    from scratchlm.train import StopRequested

    before = signal.getsignal(signal.SIGINT)
    with StopRequested() as stop:
        assert not stop.requested and signal.getsignal(signal.SIGINT) is not before
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is before  # Python's own again
    assert signal.getsignal(signal.SIGINT) is before
    errors = []

    def elsewhere():  # only the main thread may set a handler
        try:
            with StopRequested() as other:
                assert other.previous is None
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    import threading

    thread = threading.Thread(target=elsewhere)
    thread.start(), thread.join()
    assert errors == [] and signal.getsignal(signal.SIGINT) is before


def test_whole_split_loss_of_a_uniform_model_is_log_v_nats_in_bytes():
    from scratchlm.train import encode, whole_split_loss

    tokenizer = CharTokenizer("abé ")
    text = "éab a bé" * 5  # starts with a two-byte character
    ids = encode(tokenizer, text)
    model = GPT(GPTConfig(4, 8, 1, 1, 4), rng=np.random.default_rng(0))
    for param in model.params.values():
        param[...] = 0.0
    loss = whole_split_loss(model, tokenizer, TokenData(ids[:3], ids))
    predicted_bytes = len(text.encode("utf-8")) - 2  # all but the first token's
    assert loss == {
        "val_nll_whole_split": pytest.approx(math.log(4)),
        "val_bits_per_byte": pytest.approx((len(ids) - 1) * 2 / predicted_bytes),
    }
    mask = np.ones(len(ids), dtype=bool)
    assert whole_split_loss(model, tokenizer, TokenData(ids, ids, None, mask)) == {}


def test_the_spread_is_that_of_fresh_validation_window_losses():
    from scratchlm.train import estimate_spread

    ids = np.random.default_rng(1).integers(0, 11, 400).astype(np.uint16)
    data = RecordedData(ids[:200], ids[200:])
    config = TrainConfig.from_dict({**TINY, "dtype": "float64", "eval_iters": 3})
    model = start_state(config, 11).model
    spread = estimate_spread(model, data, config, n_batches=5)
    assert [split for split, _, _ in data.drawn] == ["val"] * 5
    windows = [
        model.forward(inputs[i : i + 1], targets[i : i + 1])[1]
        for _, inputs, targets in data.drawn
        for i in range(config.batch_size)
    ]
    std = float(np.std(windows, ddof=1))
    assert spread == {
        "val_window_nll_std": pytest.approx(std, rel=1e-9),
        "val_estimate_se": pytest.approx(std / math.sqrt(3 * 4), rel=1e-9),
        "val_windows_measured": 20,
    }
    fresh = data.drawn[0][1]
    estimate_loss(model, data, config, splits=("val",))  # the evaluation's windows
    assert not np.array_equal(data.drawn[-1][1], fresh)
    assert estimate_spread(model, data, config, n_batches=5) == spread  # seeded
    mask = np.ones(200, dtype=bool)
    assert estimate_spread(model, TokenData(ids, ids[200:], None, mask), config) == {}
    small = TrainConfig.from_dict({**TINY, "block_size": 2, "batch_size": 1})
    tiny = GPT(GPTConfig(11, 2, 1, 1, 4), rng=np.random.default_rng(0))
    assert estimate_spread(tiny, data, small)["val_windows_measured"] == 200


@pytest.fixture
def quick_spread(monkeypatch):
    """``estimate_spread`` over 5 batches, not 200: the tests check what it is, not how
    many windows it takes by default."""
    from scratchlm import train as train_module

    real = train_module.estimate_spread

    def estimate_spread(model, data, config):
        return real(model, data, config, n_batches=5)

    monkeypatch.setattr(train_module, "estimate_spread", estimate_spread)
    return estimate_spread


def test_run_training_saves_the_model_and_records_what_it_measured(
    tmp_path, quick_spread, capsys
):
    import hashlib

    from scratchlm.train import run_training, tokenizer_spec, whole_split_loss

    text = small_corpus(tmp_path, n_words=400).read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    data = token_data(tokenizer, text)
    config = tiny_config(tmp_path / "run", max_iters=6, eval_interval=3, log_interval=2,
                         checkpoint_interval=3)
    record = tmp_path / "run.json"
    result = run_training(config, data, tokenizer, resume=False, record=str(record),
                          extra_metrics=lambda model: {"extra": model.n_params + 1})
    model_path = tmp_path / "run" / "model.npz"
    model, loaded_tokenizer, header = load_model(model_path)
    assert header["train_config"] == dataclasses.asdict(config)
    assert "stored_dtype" not in header
    curves = result["curves"]
    assert curves["step"] == [0, 3, 6] and curves["log_step"] == [2, 4, 6]
    metrics = {
        "final_train_loss": curves["train_loss"][-1],
        "final_val_loss": curves["val_loss"][-1],
        "n_params": model.n_params,
        "median_step_ms": float(np.median(curves["step_ms"])),
        "model_file": str(model_path),
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "tokenizer_sha256": tokenizer_spec(tokenizer)["sha256"],
        **whole_split_loss(model, loaded_tokenizer, data),
        **quick_spread(model, data, config),
        "extra": model.n_params + 1,
    }
    assert result["metrics"] == metrics
    assert {"val_bits_per_byte", "val_estimate_se"} <= set(metrics)
    log = capsys.readouterr().err.splitlines()  # the log goes to stderr by default
    evaluations = [line for line in log if ": train loss " in line]
    assert evaluations == [
        f"step {step}: train loss {train:.4f}, val loss {val:.4f}"
        for step, train, val in zip(curves["step"], curves["train_loss"],
                                    curves["val_loss"])
    ]
    assert [line.split("/")[0] for line in log if "ms/step" in line] == [
        f"step {step:>6}" for step in curves["log_step"]
    ]
    assert result["elapsed_seconds"] == curves["elapsed_seconds"][-1] > 0
    written = read_record(record)
    assert written["config"] == dataclasses.asdict(config)
    assert written["metrics"] == json.loads(json.dumps(metrics))
    assert written["curves"] == json.loads(json.dumps(curves))
    assert written["elapsed_seconds"] == round(curves["elapsed_seconds"][-1], 3)
    half = tiny_config(tmp_path / "half", max_iters=2, save_dtype="float16")
    again = run_training(half, data, tokenizer, resume=False, record=None)
    assert load_model(tmp_path / "half" / "model.npz")[2]["stored_dtype"] == "float16"
    assert "extra" not in again["metrics"] and not (tmp_path / "half.json").exists()
    assert again["metrics"]["median_step_ms"] is None  # 2 steps: no log line, no time
    assert written["command"].startswith("python -m scratchlm")


def test_a_finished_run_from_older_code_reports_no_time_rather_than_a_made_up_one(
    tmp_path, quick_spread
):
    from scratchlm.train import run_training

    path, config, tokenizer = checkpoint_file(tmp_path)
    config = dataclasses.replace(config, max_iters=4)
    curves = {name: [] for name in ("log_step", "log_loss", "lr", "grad_norm")}
    curves.update(step=[4], train_loss=[2.0], val_loss=[2.5])  # no times: older code
    edit_header(path, curves=curves, step=4, elapsed_seconds=None,
                train_config=dataclasses.asdict(config))
    ids = np.random.default_rng(0).integers(0, 11, 200).astype(np.uint16)
    result = run_training(config, TokenData(ids, ids), tokenizer, resume=True,
                          record=None)
    assert result["elapsed_seconds"] == 0.0
    assert result["metrics"]["median_step_ms"] is None
    assert result["metrics"]["final_val_loss"] == 2.5


def test_train_command_trains_from_flags_over_a_config_file(
    tmp_path, capsys, quick_spread
):
    corpus_path = small_corpus(tmp_path, n_words=400)
    settings = tiny_settings(tmp_path / "first", max_iters=3)
    settings.update(corpus=str(corpus_path), eval_interval=3, log_interval=3,
                    checkpoint_interval=3, n_layer=2)
    toml = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    (tmp_path / "run.toml").write_text(toml)
    first = tmp_path / "first"
    assert main(["train", f"--config={tmp_path / 'run.toml'}", "--n_layer", "1",
                 "--bias", "False", "--record", str(tmp_path / "first.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    model, _, header = load_model(first / "model.npz")
    assert header["train_config"]["corpus"] == str(corpus_path)
    assert model.config.n_layer == 1 and model.config.bias is False  # the flags won
    assert metrics["n_params"] == model.n_params
    assert read_record(tmp_path / "first.json")["metrics"] == metrics
    # init_from, with a learning rate of 0: the run ends where the file began
    assert main(["train", f"--config={tmp_path / 'run.toml'}", "--n_layer", "1",
                 "--bias", "FALSE", f"--out_dir={tmp_path / 'second'}",
                 "--learning_rate", "0", "--min_lr", "0",
                 f"--init_from={first / 'model.npz'}"]) == 0
    capsys.readouterr()
    second, _, _ = load_model(tmp_path / "second" / "model.npz")
    for name, param in model.params.items():
        np.testing.assert_array_equal(second.params[name], param)
    with pytest.raises(SystemExit):
        main(["train", "--bias", "maybe"])
    assert "--bias" in capsys.readouterr().err


def test_sweep_trains_each_point_and_scores_its_held_out_text(
    tmp_path, monkeypatch, capsys
):
    from scratchlm import train as train_module
    from scratchlm.train import encode, sweep

    corpus_path = small_corpus(tmp_path, n_words=2000)
    text = corpus_path.read_text(encoding="utf-8")
    book = BPETokenizer.train(text, 290)
    book.save(tmp_path / "book.bpe")
    base = tiny_config(tmp_path / "not-used", max_iters=4, eval_interval=2,
                       log_interval=2, checkpoint_interval=4, corpus=str(corpus_path),
                       tokenizer=str(tmp_path / "book.bpe"))
    runs, real_train = [], train_module.train

    def spy(config, data, tokenizer, **options):
        model, curves = real_train(config, data, tokenizer, **options)
        runs.append((config, data, tokenizer, model, curves, options))
        return model, curves

    monkeypatch.setattr(train_module, "train", spy)
    points = ({"vocab_size": 270},
              {"vocab_size": book.vocab_size, "n_layer": 2, "n_embd": 8})
    results = sweep(points, base, held_out_chars=300)  # logs to stderr
    held_out = train_val_split(text)[1][:300]
    assert len(results) == len(runs) == 2
    for point, result, run in zip(points, results, runs):
        config, data, tokenizer, model, curves, options = run
        assert tokenizer.merges == truncated(book, point["vocab_size"]).merges
        shape = {k: v for k, v in point.items() if k != "vocab_size"}
        assert config == dataclasses.replace(base, **shape, out_dir=config.out_dir)
        assert config.out_dir != base.out_dir and not Path(config.out_dir).exists()
        np.testing.assert_array_equal(data.splits["val"][0],
                                      encode(tokenizer, train_val_split(text)[1]))
        assert options == {"log": sys.stderr}
        ids = encode(tokenizer, held_out)
        assert result == {
            **point,
            "n_layer": config.n_layer,
            "n_embd": config.n_embd,
            "n_params": model.n_params,
            "bits_per_byte": bits_per_byte(model, tokenizer, held_out),
            "bytes_per_token": len(held_out.encode("utf-8")) / len(ids),
            "train_seconds": curves["elapsed_seconds"][-1],
            "first_log_loss": curves["log_loss"][0],
        }
    assert results[1]["n_layer"] == 2 and results[0]["n_layer"] == 1
    assert len(runs[0][4]["elapsed_seconds"]) == 3  # evaluated at steps 0, 2 and 4
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert printed.out == ""
    for point, result in zip(points, results):
        assert f"sweep point {point}" in lines and json.dumps(result) in lines


def test_sweep_command_runs_the_points_with_the_steps_it_is_given(
    tmp_path, monkeypatch, capsys
):
    from scratchlm import train as train_module
    from scratchlm.train import BOOK_TOKENIZER, SWEEP_BASE, SWEEP_POINTS

    clock, calls = FakeClock(), []
    clock.advance(100.0)  # a clock's zero is arbitrary
    results = [{"vocab_size": 512, "bits_per_byte": 2.5}]

    def sweep(points, base, held_out_chars):
        calls.append((points, base, held_out_chars))
        clock.advance(3.0)
        return results

    monkeypatch.setattr(train_module, "sweep", sweep)
    monkeypatch.setattr(train_module, "time", clock)
    record = tmp_path / "sweep.json"
    assert main(["sweep", "--steps", "7", "--held-out-chars", "50", "--tokenizer",
                 "x.bpe", "--record", str(record)]) == 0
    assert json.loads(capsys.readouterr().out) == results
    base = dataclasses.replace(SWEEP_BASE, tokenizer="x.bpe", max_iters=7,
                               lr_decay_iters=7, eval_interval=7, checkpoint_interval=7)
    assert calls == [(SWEEP_POINTS, base, 50)]
    written = read_record(record)
    assert written["config"] == json.loads(json.dumps({
        "base": dataclasses.asdict(base), "points": list(SWEEP_POINTS),
        "held_out_chars": 50,
    }))
    assert written["metrics"] == {"points": results}
    assert written["elapsed_seconds"] == 3.0
    assert written["command"].startswith("python -m scratchlm")
    assert main(["sweep"]) == 0
    assert calls[-1] == (SWEEP_POINTS, SWEEP_BASE, 100_000)
    assert SWEEP_BASE.tokenizer == BOOK_TOKENIZER and SWEEP_BASE.max_iters == 400
    capsys.readouterr()
    for flags in (["--steps", "0"], ["--held-out-chars", "0"]):
        assert main(["sweep", *flags]) == 2
        err = capsys.readouterr().err
        assert "--steps and --held-out-chars must be positive, got" in err
        assert err.count("\n") == 1
    assert len(calls) == 2
    assert main(["sweep", "--steps", "1", "--held-out-chars", "1"]) == 0  # the least
    assert calls[-1][1].max_iters == 1 and calls[-1][2] == 1


def test_scoreboard_scores_every_model_on_one_scale_and_reuses_what_it_may(
    tmp_path, monkeypatch, capsys
):
    from scratchlm import train as train_module
    from scratchlm.train import ATTENTION_SETTINGS, scoreboard

    clock = FakeClock()
    clock.advance(100.0)  # no time passes: every measurement takes 0 s
    monkeypatch.setattr(train_module, "time", clock)

    train_path = small_corpus(tmp_path, "train.txt", seed=1, n_words=600)
    held_path = small_corpus(tmp_path, "held.txt", seed=2, n_words=100)
    attention = {**ATTENTION_SETTINGS, "steps": 3, "d_model": 8, "n_head": 2,
                 "block_size": 8, "batch_size": 4}
    both = corpus(str(train_path)) + corpus(str(held_path))
    tokenizer = CharTokenizer.from_text(both)
    gpt = GPT(GPTConfig(tokenizer.vocab_size, 8, 1, 1, 4), rng=np.random.default_rng(0))
    model_path = tmp_path / "tiny.npz"
    save_model(model_path, gpt, tokenizer)
    log = io.StringIO()
    entries = scoreboard(str(train_path), str(held_path), attention,
                         {"tiny": str(model_path)}, log=log)
    assert [entry["name"] for entry in entries] == ["bigram", "attention", "tiny"]
    train_text = train_val_split(corpus(str(train_path)))[0]
    held_out = corpus(str(held_path))
    models = char_models(train_text, held_out, attention)
    for entry in entries[:2]:
        spec, compute = models[entry["name"]]
        description, kind, n_params, bits = compute()
        assert entry["spec"] == spec and entry["model"] == description
        assert entry["tokenizer"] == kind and entry["n_params"] == n_params
        assert entry["bits_per_byte"] == pytest.approx(bits, rel=1e-12)
    loaded, loaded_tokenizer, _ = load_model(model_path)
    import hashlib

    assert {k: v for k, v in entries[2].items() if k != "seconds"} == {
        "name": "tiny",
        "model": "GPT, 1 layers of 4",
        "tokenizer": f"char ({tokenizer.vocab_size})",
        "n_params": gpt.n_params,
        "bits_per_byte": bits_per_byte(loaded, loaded_tokenizer, held_out),
        "spec": {"model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest()},
    }
    assert [entry["seconds"] for entry in entries] == [0.0, 0.0, 0.0]
    lines = log.getvalue().splitlines()
    assert lines[:2] == ["bigram: measuring", json.dumps(entries[0])]
    previous = [dict(entries[0], bits_per_byte=-1.0),
                dict(entries[2], spec={"model_sha256": "another file"})]
    log = io.StringIO()
    again = scoreboard(str(train_path), str(held_path), attention,
                       {"tiny": str(model_path)}, previous, log=log)
    assert again[0] == previous[0]  # same name and spec: reused
    assert again[2]["bits_per_byte"] == entries[2]["bits_per_byte"]  # measured again
    assert log.getvalue().splitlines()[0] == "bigram: reused"
    assert "tiny: measuring" in log.getvalue().splitlines()
    # a spec read back from a record may list its keys in another order: still reused
    reordered = dict(reversed(list(entries[1]["spec"].items())))
    previous = [dict(entries[0]), dict(entries[1], spec=reordered), dict(entries[2])]
    capsys.readouterr()
    assert scoreboard(str(train_path), str(held_path), attention,
                      {"tiny": str(model_path)}, previous) == previous
    printed = capsys.readouterr()  # the log goes to stderr when none is given
    assert printed.out == "" and printed.err.splitlines() == [
        "bigram: reused", "attention: reused", "tiny: reused"
    ]


def test_scoreboard_command_passes_its_flags_and_keeps_its_record(
    tmp_path, monkeypatch, capsys
):
    from scratchlm import train as train_module
    from scratchlm.train import ATTENTION_SETTINGS

    calls = []
    entry = {"name": "base", "model": "GPT, 4 layers of 192", "tokenizer": "bpe (4096)",
             "n_params": 1234567, "bits_per_byte": 1.23456, "seconds": 2.5, "spec": {}}

    def scoreboard(train_corpus, held_out, attention, gpts, previous):
        calls.append((train_corpus, held_out, attention, gpts, previous))
        return [entry, dict(entry, name="bigram", seconds=1.0)]

    monkeypatch.setattr(train_module, "scoreboard", scoreboard)
    record = tmp_path / "board.json"
    flags = ["--gpt", "a=x.npz", "--gpt", "b=y=z.npz", "--attention-steps", "5",
             "--train-corpus", "t", "--held-out", "h", "--record", str(record)]
    assert main(["scoreboard", *flags]) == 0
    attention = {**ATTENTION_SETTINGS, "steps": 5}
    gpts = {"a": "x.npz", "b": "y=z.npz"}
    assert calls == [("t", "h", attention, gpts, [])]
    assert capsys.readouterr().out.splitlines() == [
        "        base: 1.2346 bits per byte  (GPT, 4 layers of 192, bpe (4096), "
        "1,234,567 params)",
        "      bigram: 1.2346 bits per byte  (GPT, 4 layers of 192, bpe (4096), "
        "1,234,567 params)",
    ]
    written = read_record(record)
    assert written["config"] == {"train_corpus": "t", "held_out": "h", "gpts": gpts,
                                 "attention": attention}
    assert written["metrics"] == {"entries": [entry, dict(entry, name="bigram",
                                                          seconds=1.0)]}
    assert written["elapsed_seconds"] == 3.5
    assert written["command"].startswith("python -m scratchlm")
    assert main(["scoreboard", *flags]) == 0  # the same texts: the old entries reused
    assert calls[-1][4] == written["metrics"]["entries"]
    assert main(["scoreboard", *flags, "--held-out", "other"]) == 0
    assert calls[-1][4] == []
    record.write_text(json.dumps({**written, "metrics": {}}))  # no entries in it
    assert main(["scoreboard", *flags]) == 0
    assert calls[-1][4] == []
    capsys.readouterr()
    assert main(["scoreboard"]) == 0
    defaults = ("dostoevsky", "crime-and-punishment", ATTENTION_SETTINGS, {}, [])
    assert calls[-1] == defaults
    capsys.readouterr()
    for bad in (["--gpt=a=x", "--gpt=a=y"], ["--gpt=attention=x"], ["--gpt=a="],
                ["--attention-steps", "0"]):
        assert main(["scoreboard", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--gpt" in err or "--attention-steps" in err)
    assert len(calls) == 5


def test_sequence_nll_reads_consecutive_windows_and_a_short_tail():
    config = GPTConfig(7, 4, 1, 1, 8, dtype="float64")
    model = GPT(config, rng=np.random.default_rng(3))
    ids = np.random.default_rng(4).integers(0, 7, 11)

    def window_nats(window):  # one window: its predictions' total, in nats
        window = np.asarray(window, dtype=np.int64)[None, :]
        return model.forward(window[:, :-1], window[:, 1:])[1] * (window.shape[1] - 1)

    for length in (2, 5, 9, 10, 11):
        part = ids[:length]
        starts = range(0, length - 1, 4)  # windows of 4 predictions, then what is left
        expected = sum(window_nats(part[start : start + 5]) for start in starts)
        for batch_size in (1, 16):
            got = sequence_nll(model, part.astype(np.uint16), batch_size=batch_size)
            assert got == pytest.approx(expected, rel=1e-12), (length, batch_size)
    with pytest.raises(ScratchLMError, match="need at least 2 tokens .* got 1"):
        sequence_nll(model, ids[:1])


def test_token_ids_are_stored_in_the_smallest_unsigned_type_that_holds_them():
    from types import SimpleNamespace

    from scratchlm.train import encode

    for vocab_size, dtype in [(65_536, np.uint16), (65_537, np.uint32),
                              (131_073, np.uint32)]:
        tokenizer = SimpleNamespace(vocab_size=vocab_size,
                                    encode=lambda text, top=vocab_size - 1: [0, top])
        ids = encode(tokenizer, "any")
        assert ids.dtype == dtype and ids.tolist() == [0, vocab_size - 1]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "word", "text": "abc"}, "^the model file names no usable tokenizer$"),
        ({"kind": "char", "text": 5}, "^the model file names no usable tokenizer$"),
        ("char", "^the model file names no usable tokenizer$"),
        ({"kind": "char", "text": "abc", "sha256": "0" * 64},
         r"^the model file's tokenizer does not match its sha256 \(corrupted\?\)$"),
        ({"kind": "bpe", "text": "not a model"}, "^the model file's tokenizer"),
    ],
)
def test_a_bad_tokenizer_in_a_model_file_is_named_as_such(spec, message):
    from scratchlm.train import _spec_digest, tokenizer_from_spec

    if isinstance(spec, dict) and "sha256" not in spec:
        if isinstance(spec["text"], str):  # a right digest: only the contents are wrong
            spec = {**spec, "sha256": _spec_digest(spec)}
    with pytest.raises(ScratchLMError, match=message):
        tokenizer_from_spec(spec)


def test_config_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ScratchLMError, match=f"^no such config file: {missing}$"):
        TrainConfig.from_toml(missing)
    path = tmp_path / "bad.toml"
    path.write_text("batch_size = 0\n")
    with pytest.raises(ScratchLMError, match=f"^{path}: batch_size must be at least 1"):
        TrainConfig.from_toml(path)
    assert TrainConfig.from_toml(path, batch_size=2).batch_size == 2  # overrides win


def test_model_file_errors_name_the_file(tmp_path):
    path = small_model_file(tmp_path)
    arrays, header = load_arrays(path, MODEL_KIND)
    save_arrays(path, MODEL_KIND, arrays, {**header, "config": {"vocab_size": 5}})
    with pytest.raises(ScratchLMError, match=f"^{path}: bad GPT config"):
        load_model(path)
    half = {name: array.astype(np.float16) for name, array in arrays.items()}
    half["wte.weight"] = half["wte.weight"][:4]
    save_arrays(path, MODEL_KIND, half, {**header, "stored_dtype": "float16"})
    with pytest.raises(ScratchLMError, match=f"^{path}: tensor 'wte.weight'"):
        load_model(path)


def test_a_truncated_tokenizer_may_keep_none_or_all_of_the_merges_and_its_pattern():
    text = "low lower lowest newer newest wider " * 20
    pattern = r"\S+|\s+"
    book = BPETokenizer.train(text, 280, pattern=pattern)
    assert truncated(book, 256 + len(book.special_tokens)).merges == []
    whole = truncated(book, book.vocab_size)
    assert whole.merges == book.merges and whole.pattern == pattern


def checkpoint_file(tmp_path):
    """A fresh run's checkpoint (no steps), its config and tokenizer."""
    tokenizer = CharTokenizer("abcdefghijk")
    config = TrainConfig.from_dict({**TINY, "out_dir": str(tmp_path)})
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, start_state(config, tokenizer.vocab_size), tokenizer, config)
    return path, config, tokenizer


def edit_header(path, **changes):
    arrays, header = load_arrays(path, CHECKPOINT_KIND)
    header = {**header, **changes}
    for name in [name for name, value in changes.items() if value is None]:
        del header[name]
    save_arrays(path, CHECKPOINT_KIND, arrays, header)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train_config": None}, " has no training config$"),
        ({"step": True}, ": step must be a whole number, got True$"),
        ({"step": -1}, ": step must be a whole number, got -1$"),
        ({"step": 2.5}, ": step must be a whole number, got 2.5$"),
        ({"curves": [1]}, ": its curves are missing or malformed$"),
        ({"curves": {"step": []}}, ": its curves are missing or malformed$"),
        ({"rng_state": {"state": 1}}, ": its RNG state is missing or malformed$"),
    ],
)
def test_a_checkpoint_with_a_bad_header_is_refused_naming_it(
    tmp_path, changes, message
):
    path, config, tokenizer = checkpoint_file(tmp_path)
    edit_header(path, **changes)
    with pytest.raises(ScratchLMError, match=f"^{path}{message}"):
        load_checkpoint(path, config, tokenizer)


def test_a_checkpoint_from_older_code_loads_with_its_missing_curves_blank(tmp_path):
    path, config, tokenizer = checkpoint_file(tmp_path)
    curves = {name: [] for name in ("step", "train_loss", "val_loss", "log_step",
                                    "log_loss", "lr", "grad_norm")}
    curves["step"], curves["log_step"] = [0, 5], [1, 2, 3]
    edit_header(path, curves=curves, elapsed_seconds=None, step=7)
    state = load_checkpoint(path, config, tokenizer)
    assert state.curves["elapsed_seconds"] == [None, None]
    assert state.curves["step_ms"] == [None, None, None]
    assert state.elapsed_seconds == 0.0 and state.step == 7
    edit_header(path, elapsed_seconds=12.5)
    assert load_checkpoint(path, config, tokenizer).elapsed_seconds == 12.5
    arrays, header = load_arrays(path, CHECKPOINT_KIND)
    arrays["wte.weight"] = arrays["wte.weight"][:3]
    save_arrays(path, CHECKPOINT_KIND, arrays, header)
    with pytest.raises(ScratchLMError, match=f"^{path}: tensor 'wte.weight'"):
        load_checkpoint(path, config, tokenizer)


def test_file_kind_reads_only_a_scratchlm_header(tmp_path):
    from scratchlm.train import file_kind

    path, _, _ = checkpoint_file(tmp_path)
    assert file_kind(path) == CHECKPOINT_KIND
    assert file_kind(small_model_file(tmp_path)) == MODEL_KIND
    other = tmp_path / "other.npz"
    for header in ({"format": "another", "kind": CHECKPOINT_KIND}, [CHECKPOINT_KIND]):
        meta = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        np.savez(other, __meta__=meta)
        assert file_kind(other) is None
    other.write_bytes(b"not a zip file")
    assert file_kind(other) is None and file_kind(tmp_path / "missing.npz") is None


def test_a_model_file_whose_tokenizer_disagrees_with_its_config_is_refused(tmp_path):
    path = small_model_file(tmp_path)
    arrays, header = load_arrays(path, MODEL_KIND)
    from scratchlm.train import tokenizer_spec

    spec = tokenizer_spec(CharTokenizer("abcdef"))
    save_arrays(path, MODEL_KIND, arrays, {**header, "tokenizer": spec})
    with pytest.raises(ScratchLMError,
                       match=f"^{path}: its tokenizer has 6 tokens, its model 5$"):
        load_model(path)


def test_evaluation_scores_the_same_batches_every_time():
    ids = np.random.default_rng(2).integers(0, 11, 300).astype(np.uint16)
    config = TrainConfig.from_dict(TINY)
    model = start_state(config, 11).model
    data = TokenData(ids, ids[::-1].copy())
    first = estimate_loss(model, data, config)
    assert estimate_loss(model, data, config) == first
    assert first["train"] != first["val"]


def test_data_is_split_at_the_fraction_asked_and_read_with_the_named_tokenizer(
    tmp_path,
):
    from scratchlm.train import load_tokenizer

    path = small_corpus(tmp_path, n_words=300)
    text = path.read_text(encoding="utf-8")
    tokenizer, data = text_data(str(path), "char", val_fraction=0.5)
    train_text, val_text = train_val_split(text, 0.5)
    np.testing.assert_array_equal(data.splits["val"][0], tokenizer.encode(val_text))
    np.testing.assert_array_equal(data.splits["train"][0], tokenizer.encode(train_text))
    halves = token_data(tokenizer, text, val_fraction=0.5)
    np.testing.assert_array_equal(halves.splits["val"][0], data.splits["val"][0])
    BPETokenizer.train(text, 270).save(tmp_path / "t.bpe")
    bpe = load_tokenizer(str(tmp_path / "t.bpe"), text)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size == 270


def test_flags_alone_make_a_config_and_errors_say_so(capsys):
    assert main(["train", "--batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: command line: batch_size must be at least 1, got 0\n"


def test_the_char_models_are_chapter_1s_bigram_and_chapter_4s_attention():
    from collections import Counter

    from scratchlm.attention import TinyAttentionLM, gradient_descent, held_out_nll

    train_text, held_out = "abcab cabba " * 20, "ébacab"
    attention = {"d_model": 8, "n_head": 2, "block_size": 6, "batch_size": 3,
                 "learning_rate": 0.3, "steps": 4, "seed": 5}
    models = char_models(train_text, held_out, attention)
    assert list(models) == ["bigram", "attention"]
    alphabet = sorted(set(train_text + held_out))
    size = len(alphabet)
    predicted_bytes = len(held_out.encode("utf-8")) - 2  # all but "é"
    spec, compute = models["bigram"]
    assert spec == {"smoothing": 1.0}
    pairs, contexts = Counter(zip(train_text, train_text[1:])), Counter(train_text[:-1])
    nats = -sum(math.log((pairs[a, b] + 1) / (contexts[a] + size))
                for a, b in zip(held_out, held_out[1:]))
    assert compute() == (
        "count bigram (chapter 1)", f"characters ({size})", size**2,
        pytest.approx(nats / math.log(2) / predicted_bytes, rel=1e-9),
    )
    spec, compute = models["attention"]
    assert spec is attention
    tokenizer = CharTokenizer("".join(alphabet))
    model = TinyAttentionLM(size, 6, 8, 2, rng=np.random.default_rng(5))
    gradient_descent(model, tokenizer.encode(train_text), steps=4, batch_size=3,
                     learning_rate=0.3, rng=np.random.default_rng(6), log_every=4)
    held_ids = tokenizer.encode(held_out)
    bits = held_out_nll(model, held_ids) * (len(held_ids) - 1) / math.log(2)
    n_params = sum(param.size for param in model.params.values())
    assert compute() == ("one attention layer (chapter 4)", f"characters ({size})",
                         n_params, pytest.approx(bits / predicted_bytes, rel=1e-9))


def test_the_training_commands_document_themselves_and_read_booleans():
    from conftest import assert_documented

    from scratchlm.cli import build_parser

    assert_documented("train", "sweep", "scoreboard")
    parser = build_parser()
    assert parser.parse_args(["train", "--bias", "TRUE"]).bias is True
    assert parser.parse_args(["train", "--bias", "false"]).bias is False
    assert parser.parse_args(["train"]).bias is None  # not given: the file's value


def test_a_compressed_model_file_damaged_anywhere_is_a_one_line_error(tmp_path):
    from scratchlm.train import file_kind

    path = small_model_file(tmp_path)
    data = path.read_bytes()
    for at in range(30, len(data), max(1, len(data) // 80)):  # the header's bytes too
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
        assert file_kind(path) in (MODEL_KIND, None)
        try:
            load_model(path)
        except ScratchLMError as error:
            assert "\n" not in str(error)


def test_a_progress_line_shows_the_step_loss_rate_speed_and_time_left():
    from scratchlm.train import progress_line

    assert progress_line(1234, 2000, 1.23456, 3e-4, 0.5, 12.5, 768, 125.0) == (
        "step   1234/2000  loss 1.2346  lr 3.00e-04  |g|  0.500     12 ms/step  "
        "61,440 tok/s  ETA 2m05s"
    )
    assert progress_line(5, 10, 4.0, 1e-3, 12.3456, 2000.0, 64, 3725.9) == (
        "step      5/10  loss 4.0000  lr 1.00e-03  |g| 12.346   2000 ms/step  "
        "32 tok/s  ETA 62m05s"
    )


def test_model_files_are_deflated_and_checkpoints_are_not(tmp_path):
    import zipfile

    path, _, _ = checkpoint_file(tmp_path)
    with zipfile.ZipFile(path) as archive:
        assert {entry.compress_type for entry in archive.infolist()} == {
            zipfile.ZIP_STORED
        }  # rewritten every few minutes: not worth the time
    with zipfile.ZipFile(small_model_file(tmp_path)) as archive:
        assert {entry.compress_type for entry in archive.infolist()} == {
            zipfile.ZIP_DEFLATED
        }  # written once and kept


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_a_parameter_too_large_for_float16_is_refused_by_name(tmp_path):
    from scratchlm.train import HALF

    model = GPT(GPTConfig(5, 4, 1, 1, 4), rng=np.random.default_rng(0))
    model.params["wpe.weight"][0, 0] = 1e6  # float16 holds at most 65504
    with pytest.raises(ScratchLMError,
                       match="^the largest parameter stored as float16 is inf"):
        save_model(tmp_path / "m.npz", model, CharTokenizer("abcde"), store_dtype=HALF)


def counting_ids(seed=0, n=400):
    return np.random.default_rng(seed).integers(0, 11, n).astype(np.uint16)


def test_the_log_and_curves_time_each_step_on_the_clock(tmp_path, monkeypatch):
    from scratchlm import train as train_module

    clock = FakeClock()
    clock.advance(100.0)
    real_step, real_estimate = train_module.train_step, train_module.estimate_loss

    def train_step(*args):  # half a second a step
        clock.advance(0.5)
        return real_step(*args)

    def estimate_loss(*args, **options):  # two seconds an evaluation
        clock.advance(2.0)
        return real_estimate(*args, **options)

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "train_step", train_step)
    monkeypatch.setattr(train_module, "estimate_loss", estimate_loss)
    config = tiny_config(tmp_path, max_iters=6, eval_interval=4, log_interval=2,
                         checkpoint_interval=4, grad_accum=2)
    ids = counting_ids()
    log = io.StringIO()
    _, curves = train(config, TokenData(ids, ids), CharTokenizer("abcdefghijk"),
                      log=log)
    assert curves["step"] == [0, 4, 6]
    assert curves["elapsed_seconds"] == [0.0, 4.0, 7.0]  # evaluations count too
    assert curves["step_ms"] == [500.0, 500.0, 500.0]
    progress = [line for line in log.getvalue().splitlines() if "ms/step" in line]
    # 4 x 16 tokens x 2 micro-batches a step; ETA: the steps left at this pace so far
    ends = ["500 ms/step  256 tok/s  ETA 0m06s", "500 ms/step  256 tok/s  ETA 0m02s",
            "500 ms/step  256 tok/s  ETA 0m00s"]
    assert [line[-len(end):] for line, end in zip(progress, ends)] == ends
    log = io.StringIO()  # resumed to step 10: the pace is this session's own
    train(dataclasses.replace(config, max_iters=10), TokenData(ids, ids),
          CharTokenizer("abcdefghijk"), resume=True, log=log)
    progress = [line for line in log.getvalue().splitlines() if "ms/step" in line]
    assert progress[0].startswith("step      8/10") and progress[0].endswith("0m01s")


def test_a_failed_step_says_which_checkpoint_is_left(tmp_path, monkeypatch):
    from scratchlm import train as train_module

    real_step = train_module.train_step

    def train_step(state, data, config, parallel):
        if state.step == fail_at:
            raise ScratchLMError(f"boom at {state.step}")
        return real_step(state, data, config, parallel)

    monkeypatch.setattr(train_module, "train_step", train_step)
    ids, tokenizer = counting_ids(), CharTokenizer("abcdefghijk")
    data, path = TokenData(ids, ids), tmp_path / "checkpoint.npz"
    config = tiny_config(tmp_path, max_iters=6, checkpoint_interval=4)
    nothing = f"^nothing to resume: no checkpoint at {path}$"
    with pytest.raises(ScratchLMError, match=nothing):
        train(config, data, tokenizer, resume=True, log=io.StringIO())
    fail_at = 2
    with pytest.raises(ScratchLMError, match="^boom at 2; no checkpoint yet$"):
        train(config, data, tokenizer, log=io.StringIO())
    fail_at = 5
    with pytest.raises(ScratchLMError,
                       match=f"^boom at 5; kept the checkpoint of step 4 at {path}$"):
        train(config, data, tokenizer, log=io.StringIO())
    with pytest.raises(ScratchLMError,
                       match=f"^boom at 5; kept the checkpoint of step 4 at {path}$"):
        train(config, data, tokenizer, resume=True, log=io.StringIO())


def test_ctrl_c_in_process_saves_the_step_it_finished_and_says_how_to_go_on(
    tmp_path, monkeypatch
):
    from scratchlm import train as train_module

    real_step = train_module.train_step

    def train_step(state, data, config, parallel):
        result = real_step(state, data, config, parallel)
        if state.step == 3:
            signal.raise_signal(signal.SIGINT)  # during step 3: it is finished first
        return result

    monkeypatch.setattr(train_module, "train_step", train_step)
    ids, tokenizer = counting_ids(), CharTokenizer("abcdefghijk")
    config = tiny_config(tmp_path, max_iters=8, checkpoint_interval=5)
    log = io.StringIO()
    with pytest.raises(KeyboardInterrupt, match="^stopped at step 3$"):
        train(config, TokenData(ids, ids), tokenizer, log=log)
    path = tmp_path / "checkpoint.npz"
    assert log.getvalue().splitlines()[-1] == (
        f"stopped at step 3: saved {path}; continue with --resume"
    )
    assert load_checkpoint(path, config, tokenizer).step == 3


def test_a_bpe_model_file_round_trips_its_tokenizer(tmp_path):
    from scratchlm.train import tokenizer_spec

    text = "low lower lowest newer newest wider " * 20
    bpe = BPETokenizer.train(text, 270)
    model = GPT(GPTConfig(bpe.vocab_size, 4, 1, 1, 4), rng=np.random.default_rng(0))
    save_model(tmp_path / "m.npz", model, bpe)
    _, loaded, _ = load_model(tmp_path / "m.npz")
    assert isinstance(loaded, BPETokenizer) and loaded.merges == bpe.merges
    unknown = "^cannot store a tokenizer of type object$"
    with pytest.raises(ScratchLMError, match=unknown):
        tokenizer_spec(object())


def test_batches_are_consecutive_windows_from_every_start_masked_at_the_target():
    ids = np.arange(30, dtype=np.uint16)
    mask = ids % 3 == 0
    inputs, targets = TokenData(ids, ids, mask).batch("train", 50, 4,
                                                     np.random.default_rng(0))
    assert (np.diff(inputs, axis=1) == 1).all()
    assert np.all(np.where((inputs + 1) % 3 == 0, targets == inputs + 1,
                           targets == IGNORE))
    short = TokenData(ids[:6], ids)  # windows of 4 can start at 0 or 1
    starts = {int(short.batch("train", 1, 4, np.random.default_rng(seed))[0][0, 0])
              for seed in range(20)}
    assert starts == {0, 1}


def test_config_values_at_their_limits_are_accepted_and_just_past_refused():
    least = {name: 1 for name in ("batch_size", "grad_accum", "max_iters",
                                  "eval_interval", "eval_iters", "log_interval",
                                  "checkpoint_interval", "lr_decay_iters")}
    config = TrainConfig.from_dict({**least, "warmup_iters": 0, "beta1": 0.0,
                                    "learning_rate": 1, "min_lr": 0, "grad_clip": 0})
    assert config.learning_rate == 1.0 and type(config.learning_rate) is float
    for changes, message in [
        ({"min_lr": 0.5, "learning_rate": 0.1},
         "need 0 <= min_lr <= learning_rate, got min_lr 0.5 and learning_rate 0.1"),
        ({"grad_clip": -1}, "grad_clip must be >= 0, got -1.0"),
        ({"weight_decay": float("nan")}, "weight_decay must be >= 0, got nan"),
        ({"beta1": -0.1}, r"beta1 must be in \[0, 1\), got -0.1"),
    ]:
        with pytest.raises(ScratchLMError, match=f"^config: {message}$"):
            TrainConfig.from_dict(changes)


def test_a_new_run_starts_from_its_seed_or_from_the_model_it_is_given():
    config = TrainConfig.from_dict(TINY)
    state = start_state(config, 11)
    first = np.random.default_rng(config.seed + 1).integers(0, 1000, 5)
    assert state.rng.integers(0, 1000, 5).tolist() == first.tolist()  # seed + 1
    assert state.optimizer.betas == (0.9, 0.99) and state.optimizer.weight_decay == 0.1
    other = GPT(GPTConfig(11, 16, 1, 2, 16), rng=np.random.default_rng(5))
    given = start_state(config, 11, init_model=other)
    for name, param in other.params.items():
        np.testing.assert_array_equal(given.model.params[name], param)
    wrong = GPT(GPTConfig(11, 16, 1, 2, 8), rng=np.random.default_rng(5))
    with pytest.raises(ScratchLMError, match="^init_from: tensor 'wte.weight'"):
        start_state(config, 11, init_model=wrong)


def test_a_batch_with_one_counted_target_trains_and_one_with_none_is_refused():
    ids = np.arange(17, dtype=np.uint16) % 11  # one window of 16: always the same
    config = TrainConfig.from_dict({**TINY, "batch_size": 1})
    one = np.zeros(17, dtype=bool)
    one[16] = True
    state = start_state(config, 11)
    loss, _, _ = train_step(state, TokenData(ids, ids, one), config)
    assert math.isfinite(loss) and state.step == 1
    with pytest.raises(ScratchLMError,
                       match="^every target of the batch at step 1 is masked$"):
        train_step(state, TokenData(ids, ids, np.zeros(17, dtype=bool)), config)


def test_a_checkpoint_keeps_the_run_time_and_curves(tmp_path):
    path, config, tokenizer = checkpoint_file(tmp_path)
    state = start_state(config, tokenizer.vocab_size)
    state.step, state.elapsed_seconds = 3, 12.5
    state.curves["step"].append(0)
    save_checkpoint(path, state, tokenizer, config)
    loaded = load_checkpoint(path, config, tokenizer)
    assert loaded.elapsed_seconds == 12.5 and loaded.curves == state.curves
