"""Chapter 7: sampling, the KV cache, streaming text, the CLI, and the GPT-2 export."""

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_documented
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.bpe import BPETokenizer
from scratchlm.chars import CharTokenizer
from scratchlm.cli import main
from scratchlm.errors import ScratchLMError
from scratchlm.export import (
    export_gpt2, gpt2_names, import_gpt2, read_safetensors, write_safetensors,
)
from scratchlm.generate import (
    KVCache, SamplingConfig, TextStream, forward_cached, generate, incomplete_tail,
    next_token_probs, sample_token,
)
from scratchlm.train import (
    TokenData, TrainConfig, bits_per_byte, load_model, save_model, sequence_nll, train,
)
from scratchlm.transformer import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The old woman said: “naïve café”, and Раскольников — went out. " * 6


@functools.cache
def trained_tokenizer():
    return BPETokenizer.train(TEXT, 300)


@pytest.fixture(scope="module")
def tokenizer():
    return trained_tokenizer()


def tiny_model(vocab_size=300, dtype="float32", block_size=16, bias=True, seed=0):
    """A random GPT whose logits are O(1), not the near-zero ones of GPT-2's init."""
    config = GPTConfig(vocab_size, block_size, 2, 2, 16, bias=bias, dtype=dtype)
    model = GPT(config, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for param in model.params.values():
        param[...] += rng.normal(0.0, 0.3, param.shape)
    return model


def all_cached_logits(model, ids, n_prefill):
    cache = KVCache(model.config, batch=ids.shape[0])
    rows = [forward_cached(model, ids[:, :n_prefill], cache)]
    for t in range(n_prefill, ids.shape[1]):
        rows.append(forward_cached(model, ids[:, t : t + 1], cache))
    return np.concatenate(rows, axis=1)


# ---- the KV cache -------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("n_prefill", [1, 5, 16])
def test_cached_logits_equal_uncached_at_every_position(dtype, tolerance, n_prefill):
    model = tiny_model(dtype=dtype)
    ids = np.random.default_rng(3).integers(0, 300, size=(2, 16))
    uncached = model.forward(ids)
    cached = all_cached_logits(model, ids, n_prefill)
    assert cached.dtype == uncached.dtype == np.dtype(dtype)
    assert np.abs(uncached).max() > 1.0  # the comparison is not between near-zeros
    np.testing.assert_allclose(cached, uncached, rtol=0, atol=tolerance)


def test_cache_refuses_tokens_beyond_the_block():
    model = tiny_model()
    cache = KVCache(model.config)
    forward_cached(model, np.zeros((1, 16), dtype=np.int64), cache)
    with pytest.raises(ScratchLMError, match="do not fit"):
        forward_cached(model, np.zeros((1, 1), dtype=np.int64), cache)


def test_cache_memory_per_token():
    config = GPTConfig(300, 16, 3, 2, 16, dtype="float64")
    assert KVCache(config).bytes_per_token() == 2 * 3 * 16 * 8


# ---- sampling -----------------------------------------------------------------------

LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.1, -0.3, -1.0, -2.5])


def reference_probs(logits, temperature, top_k=None, top_p=None):
    """The filtered, renormalised distribution, computed the slow, obvious way."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    keep = order[:top_k] if top_k else order
    weights = {i: math.exp(logits[i] / temperature) for i in keep}
    total = sum(weights.values())
    if top_p is not None:
        chosen, mass = [], 0.0
        for i in keep:
            chosen.append(i)
            mass += weights[i] / total
            if mass >= top_p:
                break
        weights = {i: weights[i] for i in chosen}
        total = sum(weights.values())
    probs = np.zeros(len(logits))
    for i, w in weights.items():
        probs[i] = w / total
    return probs


@pytest.mark.parametrize("settings_", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0),
    dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.3, top_k=5, top_p=0.8),
], ids=str)
def test_empirical_frequencies_match_the_filtered_distribution(settings_):
    expected = reference_probs(LOGITS, **settings_)
    probs = next_token_probs(LOGITS.astype(np.float32), SamplingConfig(**settings_))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    rng = np.random.default_rng(7)
    draws = 20_000
    counts = np.bincount([sample_token(probs, rng) for _ in range(draws)], minlength=len(LOGITS))
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    support = expected > 0
    chi2 = float((((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum())
    dof = max(int(support.sum()) - 1, 1)
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # about 6 standard deviations


def test_temperature_zero_is_greedy_without_dividing_by_zero():
    with np.errstate(all="raise"):
        probs = next_token_probs(LOGITS, SamplingConfig(temperature=0))
    assert probs.tolist() == [1.0] + [0.0] * 7


def test_greedy_generation_is_argmax_at_every_step():
    model = tiny_model()
    tokens = list(generate(model, [3, 1], rng=np.random.default_rng(0),
                           sampling=SamplingConfig(temperature=0), max_new_tokens=10))
    ids = [3, 1]
    for token in tokens:
        assert token == int(np.argmax(model.forward(np.asarray([ids]))[0, -1]))
        ids.append(token)


def test_top_k_edge_cases():
    base = next_token_probs(LOGITS, SamplingConfig())
    assert np.allclose(next_token_probs(LOGITS, SamplingConfig(top_k=8)), base)
    assert np.allclose(next_token_probs(LOGITS, SamplingConfig(top_k=100)), base)
    assert next_token_probs(LOGITS, SamplingConfig(top_k=1)).tolist() == [1.0] + [0.0] * 7
    tied = np.array([1.0, 3.0, 3.0, 0.0])  # a tie at the k-th value keeps both
    kept = next_token_probs(tied, SamplingConfig(top_k=1)) > 0
    assert kept.tolist() == [False, True, True, False]


def test_top_p_edge_cases():
    base = next_token_probs(LOGITS, SamplingConfig())
    for tiny in (1e-9, 0.01, base[0] / 2):  # below the top token's mass: greedy, never empty
        assert next_token_probs(LOGITS, SamplingConfig(top_p=tiny)).tolist() == [1.0] + [0.0] * 7
    assert np.allclose(next_token_probs(LOGITS, SamplingConfig(top_p=1.0)), base)
    # just above the top token's mass, the token that crosses p is kept: two candidates
    assert (next_token_probs(LOGITS, SamplingConfig(top_p=base[0] + 1e-9)) > 0).sum() == 2
    uniform = next_token_probs(np.zeros(4), SamplingConfig(top_p=0.5))
    assert uniform.tolist() == [0.5, 0.5, 0.0, 0.0]  # ties ranked by position, mass 0.5 reached


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(temperature=True), dict(top_k=0), dict(top_k=2.5), dict(top_k=True),
    dict(top_p=0), dict(top_p=1.5), dict(top_p=float("nan")),
])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ScratchLMError):
        SamplingConfig(**bad)


def test_first_generated_token_follows_the_model_distribution():
    model = tiny_model()
    sampling = SamplingConfig(temperature=0.8, top_k=6)
    expected = next_token_probs(model.forward(np.asarray([[5, 9, 2]]))[0, -1], sampling)
    draws = 1000
    firsts = [next(generate(model, [5, 9, 2], rng=np.random.default_rng(seed), sampling=sampling,
                            max_new_tokens=1)) for seed in range(draws)]
    counts = np.bincount(firsts, minlength=len(expected))
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2 = float((((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)


# ---- generate: stop tokens, stopping early, long prompts ------------------------------


def test_stop_token_ends_generation_and_is_yielded_last():
    model = tiny_model()
    greedy = SamplingConfig(temperature=0)
    free = list(generate(model, [1], rng=np.random.default_rng(0), sampling=greedy,
                         max_new_tokens=12))
    stop = free[3]
    stopped = list(generate(model, [1], rng=np.random.default_rng(0), sampling=greedy,
                            max_new_tokens=12, stop_tokens={stop}))
    assert stopped == free[: free.index(stop) + 1]


def test_max_new_tokens_and_stopping_early():
    model = tiny_model()
    rng = np.random.default_rng(0)
    assert list(generate(model, [1], rng=rng, max_new_tokens=0)) == []
    assert len(list(generate(model, [1], rng=rng, max_new_tokens=7))) == 7
    stream = generate(model, [1], rng=rng, max_new_tokens=1000)
    first_two = [next(stream), next(stream)]
    stream.close()  # what a consumer does when the user says stop
    assert len(first_two) == 2
    with pytest.raises(StopIteration):
        next(stream)


def test_bad_prompts_and_stop_tokens_are_refused():
    model = tiny_model()
    rng = np.random.default_rng(0)
    for prompt in ([], [300], [-1]):
        with pytest.raises(ScratchLMError):
            next(generate(model, prompt, rng=rng))
    with pytest.raises(ScratchLMError):
        next(generate(model, [1], rng=rng, stop_tokens=[999]))
    with pytest.raises(ScratchLMError):
        next(generate(model, [1], rng=rng, max_new_tokens=-1))


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_long_prompt_is_cropped_to_the_last_block(use_cache):
    model = tiny_model()
    prompt = np.random.default_rng(4).integers(0, 300, size=40).tolist()
    greedy = SamplingConfig(temperature=0)
    first = next(generate(model, prompt, rng=np.random.default_rng(0), sampling=greedy,
                          use_cache=use_cache))
    assert first == int(np.argmax(model.forward(np.asarray([prompt[-16:]]))[0, -1]))


def test_cache_equals_no_cache_until_the_block_fills_then_keeps_going():
    model = tiny_model()
    greedy = SamplingConfig(temperature=0)
    runs = [list(generate(model, [7], rng=np.random.default_rng(0), sampling=greedy,
                          max_new_tokens=50, use_cache=use_cache)) for use_cache in (True, False)]
    assert len(runs[0]) == len(runs[1]) == 50
    assert runs[0][:16] == runs[1][:16]  # 1 prompt token + 15 new ones fill the block


def test_train_save_load_generate_gives_the_same_tokens(tmp_path):
    text = "abcabcabd" * 40
    chars = CharTokenizer.from_text(text)
    ids = np.asarray(chars.encode(text), dtype=np.uint16)
    config = TrainConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, batch_size=4,
                         max_iters=3, eval_interval=3, eval_iters=1, log_interval=1,
                         warmup_iters=1, lr_decay_iters=3, out_dir=str(tmp_path / "run"))
    model, _ = train(config, TokenData(ids[:300], ids[300:]), chars, log=open(os.devnull, "w"))
    save_model(tmp_path / "model.npz", model, chars)
    loaded, loaded_chars, _ = load_model(tmp_path / "model.npz")
    for use_cache in (True, False):
        runs = [list(generate(m, chars.encode("ab"), rng=np.random.default_rng(5),
                              max_new_tokens=30, use_cache=use_cache)) for m in (model, loaded)]
        assert runs[0] == runs[1]
    assert loaded_chars.alphabet == chars.alphabet


# ---- streaming text -----------------------------------------------------------------


def test_incomplete_tail():
    euro = "€".encode()  # 3 bytes
    assert incomplete_tail(b"") == 0
    assert incomplete_tail(b"ab") == 0
    assert incomplete_tail(b"a" + euro) == 0
    assert incomplete_tail(b"a" + euro[:1]) == 1
    assert incomplete_tail(b"a" + euro[:2]) == 2
    assert incomplete_tail("😀".encode()[:3]) == 3
    assert incomplete_tail(b"\x80\x80\x80") == 0  # stray continuation bytes: nothing to wait for


def byte_tokenizer():
    return BPETokenizer([])  # no merges: token i is byte i, the worst case for streaming


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_streamed_bytes_decode_exactly_as_a_whole(data):
    stream = TextStream(byte_tokenizer())
    pieces = [stream.push(byte) for byte in data] + [stream.flush()]
    assert "".join(pieces) == data.decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_valid_text_streams_without_replacement_characters(text):
    for tok in (byte_tokenizer(), trained_tokenizer()):
        stream = TextStream(tok)
        pieces = [stream.push(t) for t in tok.encode_ordinary(text)] + [stream.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


# ---- the command line ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model") / "tiny.npz"
    save_model(path, tiny_model(vocab_size=tokenizer.vocab_size), tokenizer)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_cli_streams_text_and_is_reproducible(capsys, model_file, tokenizer):
    args = ("generate", "--model", model_file, "--prompt", "The old", "--max-new-tokens", 20,
            "--seed", 3)
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and out.startswith("The old")
    assert run_cli(capsys, *args)[1] == out
    code, out_json, _ = run_cli(capsys, *args, "--json")
    result = json.loads(out_json)
    assert result["finish_reason"] in ("length", "stop")
    n_prompt = len(tokenizer.encode("The old"))
    assert result["prompt_tokens"] == n_prompt and not result["cropped"]
    assert out == "The old" + result["text"] + "\n"
    code, out_nocache, _ = run_cli(capsys, *args, "--json", "--no-cache")
    same = 16 - n_prompt + 1  # new tokens before the context outgrows the block
    assert json.loads(out_nocache)["tokens"][:same] == result["tokens"][:same]


def test_generate_cli_crops_a_long_prompt_with_a_note(capsys, model_file):
    code, out, err = run_cli(capsys, "generate", "--model", model_file, "--prompt", TEXT,
                             "--max-new-tokens", 3, "--json")
    assert code == 0 and json.loads(out)["cropped"]
    assert "sees the last 16" in err


@pytest.mark.parametrize("extra, message", [
    (("--prompt", "x <|endoftext|>"), "special token"),
    (("--prompt", ""), "empty"),
    (("--prompt", "x", "--temperature", "-1"), "temperature"),
    (("--prompt", "x", "--top-p", "1.5"), "top_p"),
    (("--prompt", "x", "--top-k", "0"), "top_k"),
    (("--prompt", "x", "--max-new-tokens", "-2"), "max-new-tokens"),
    ((), "--prompt"),
])
def test_generate_cli_user_errors_are_one_line(capsys, model_file, extra, message):
    code, _, err = run_cli(capsys, "generate", "--model", model_file, *extra)
    assert code == 2 and message in err and err.count("\n") == 1


def test_generate_cli_allows_special_tokens_when_asked(capsys, model_file):
    code, out, _ = run_cli(capsys, "generate", "--model", model_file, "--prompt",
                           "x <|endoftext|>", "--allow-special", "--max-new-tokens", 2, "--json")
    assert code == 0 and json.loads(out)["prompt_tokens"] >= 2


def test_generate_cli_bad_model_files_and_flags_exit_2(capsys, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a model")
    for path in (tmp_path / "missing.npz", garbage):
        code, _, err = run_cli(capsys, "generate", "--model", path, "--prompt", "x")
        assert code == 2 and err.count("\n") == 1 and str(path) in err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--temperature", "warm"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_ctrl_c_stops_generation_cleanly(tmp_path):
    chars = CharTokenizer.from_text(TEXT)  # no special tokens: nothing but Ctrl-C stops it
    model_path = tmp_path / "chars.npz"
    save_model(model_path, tiny_model(vocab_size=chars.vocab_size), chars)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "scratchlm", "generate", "--model", str(model_path), "--prompt",
         "The", "--max-new-tokens", "100000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env,
        # a shell that starts jobs in the background hands them SIGINT ignored;
        # Python then never installs KeyboardInterrupt, so restore the default first
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    received = process.stdout.read(len("The") + 20)  # the prompt, then generated text
    assert received.startswith(b"The")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert b"interrupted after" in err and b"Traceback" not in err


def test_generate_bench_cli(capsys, model_file):
    code, out, _ = run_cli(capsys, "generate", "bench", "--model", model_file, "--new-tokens", 10,
                           "--json")
    result = json.loads(out)
    assert code == 0 and result["new_tokens"] == 10 and result["speedup"] > 0
    assert result["same_tokens"]  # 10 new tokens stay within the 16-token block


def test_evaluate_cli_reports_loss_and_bits_per_byte(capsys, tmp_path, model_file):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT[:200], encoding="utf-8")
    code, out, _ = run_cli(capsys, "evaluate", "--model", model_file, "--text-file", text_file,
                           "--json")
    result = json.loads(out)
    model, tok, _ = load_model(model_file)
    ids = tok.encode(TEXT[:200])
    assert code == 0 and result["tokens"] == len(ids)
    assert result["loss"] == pytest.approx(sequence_nll(model, np.asarray(ids)) / (len(ids) - 1))
    assert result["bits_per_byte"] == pytest.approx(bits_per_byte(model, tok, TEXT[:200]))
    code, _, err = run_cli(capsys, "evaluate", "--model", model_file, "--text-file",
                           tmp_path / "none.txt")
    assert code == 2 and err.count("\n") == 1


# ---- the GPT-2 export ----------------------------------------------------------------


def test_export_is_read_by_the_safetensors_package(tmp_path, tokenizer):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    paths = export_gpt2(model, tokenizer, tmp_path)
    assert sorted(p.name for p in paths) == ["config.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    names = gpt2_names(2)
    assert set(tensors) == set(names.values())
    assert "transformer.h.1.attn.c_attn.weight" in tensors
    for ours, theirs in names.items():
        assert tensors[theirs].shape == model.params[ours].shape
        assert np.array_equal(tensors[theirs], model.params[ours])
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # (in, out)
    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as handle:
        assert handle.metadata()["format"] == "pt"  # what Hugging Face's loader checks
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert config["n_positions"] == config["n_ctx"] == 16 and config["n_embd"] == 16
    assert config["n_layer"] == 2 and config["n_head"] == 2
    assert config["vocab_size"] == tokenizer.vocab_size
    assert config["layer_norm_epsilon"] == 1e-5 and config["tie_word_embeddings"] is True


@pytest.mark.parametrize("dtype, bias", [("float32", True), ("float64", True), ("float32", False)])
def test_export_import_round_trip_gives_identical_logits(tmp_path, tokenizer, dtype, bias):
    model = tiny_model(vocab_size=tokenizer.vocab_size, dtype=dtype, bias=bias)
    export_gpt2(model, tokenizer, tmp_path)
    imported, imported_tokenizer = import_gpt2(tmp_path)
    ids = np.random.default_rng(0).integers(0, tokenizer.vocab_size, size=(2, 16))
    assert np.array_equal(imported.forward(ids), model.forward(ids))
    assert imported_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


def test_our_reader_reads_the_safetensors_package_output(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4),
               "empty": np.zeros((0, 3), dtype=np.float32)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    read, metadata = read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and np.array_equal(read[name], tensor)


def raw_file(path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
    ({"t": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype 'BF16'"),
    ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets"),
    ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "data_offsets"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8,
     "stray bytes after tensor"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": 1}},
     b"\0" * 4, "__metadata__"),
])
def test_malformed_safetensors_are_one_line_errors_naming_file_and_tensor(tmp_path, header, data,
                                                                          message):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ScratchLMError, match=message) as error:
        read_safetensors(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    if "__metadata__" not in header:
        assert "'t'" in str(error.value)


def test_malformed_headers_are_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    for content, message in [
        (b"\x01\x02", "truncated"),
        ((10**12).to_bytes(8, "little") + b"{}", "not safetensors"),
        ((100).to_bytes(8, "little") + b"{}", "truncated"),
        ((5).to_bytes(8, "little") + b"{,,,}", "not JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((29).to_bytes(8, "little") + b'{"__metadata__":{},"a":1,"a":2}'[:29], "not JSON|twice"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ScratchLMError, match=message):
            read_safetensors(path)
    text = b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{}}'
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(ScratchLMError, match="twice"):
        read_safetensors(path)
    with pytest.raises(ScratchLMError, match="cannot read"):
        read_safetensors(tmp_path / "missing.safetensors")


def test_every_truncation_of_an_export_is_refused(tmp_path, tokenizer):
    export_gpt2(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, tmp_path)
    whole = (tmp_path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    for length in (0, 7, 8, 100, len(whole) // 2, len(whole) - 1):
        cut.write_bytes(whole[:length])
        with pytest.raises(ScratchLMError, match="truncated|not JSON|no header"):
            read_safetensors(cut)


def test_import_names_the_file_and_the_first_tensor_that_disagrees_with_config_json(tmp_path, tokenizer):
    export_gpt2(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors, metadata = read_safetensors(weights)
    cut = {name: np.array(t) for name, t in tensors.items()}
    cut["transformer.h.0.mlp.c_fc.weight"] = cut["transformer.h.0.mlp.c_fc.weight"][:, :5].copy()
    write_safetensors(weights, cut, metadata)  # a valid header, one tensor cut to 5 columns
    with pytest.raises(ScratchLMError) as caught:
        import_gpt2(tmp_path)
    assert str(caught.value) == (f"{weights}: tensor 'transformer.h.0.mlp.c_fc.weight' should be "
                                 "float32[16, 64], got float32[16, 5]")
    result = subprocess.run([sys.executable, "-m", "scratchlm", "import", "--model-dir", str(tmp_path),
                             "--out", str(tmp_path / "back.npz")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "c_fc.weight" in result.stderr


def test_import_refuses_wrong_shapes_dtypes_names_and_configs(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    export_gpt2(model, tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors, metadata = read_safetensors(weights)
    good = {name: np.array(t) for name, t in tensors.items()}
    name = "transformer.h.0.attn.c_attn.weight"
    for changed, message in [
        ({**good, name: good[name].T},
         re.escape("c_attn.weight' should be float32[16, 48], got float32[48, 16]")),
        ({**good, name: good[name].astype(np.float64)}, "c_attn.weight' should be float32"),
        ({k: v for k, v in good.items() if k != name}, "c_attn.weight' should be .*missing"),
        ({**good, "lm_head.weight": good["transformer.wte.weight"]}, "lm_head.weight"),
    ]:
        write_safetensors(weights, changed, metadata)
        with pytest.raises(ScratchLMError, match=message):
            import_gpt2(tmp_path)
    write_safetensors(weights, good, {"format": "pt"})
    with pytest.raises(ScratchLMError, match="scratchlm.tokenizer"):
        import_gpt2(tmp_path)
    write_safetensors(weights, good, metadata)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [({"activation_function": "relu"}, "activation_function"),
                            ({"model_type": "llama"}, "model_type"),
                            ({"n_inner": 7}, "n_inner"), ({"n_head": 3}, "divisible"),
                            ({"n_positions": 8}, "wpe.weight")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ScratchLMError, match=message):
            import_gpt2(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ScratchLMError, match="not JSON"):
        import_gpt2(tmp_path)


def test_export_and_import_cli(capsys, tmp_path, model_file):
    out_dir = tmp_path / "hf"
    code, out, _ = run_cli(capsys, "export", "--model", model_file, "--out", out_dir, "--json")
    assert code == 0 and set(json.loads(out)["files"]) == {"model.safetensors", "config.json"}
    code, out, _ = run_cli(capsys, "import", "--model-dir", out_dir, "--out", tmp_path / "back.npz")
    assert code == 0
    original, back = load_model(model_file)[0], load_model(tmp_path / "back.npz")[0]
    ids = np.arange(16)[None, :]
    assert np.array_equal(original.forward(ids), back.forward(ids))
    code, _, err = run_cli(capsys, "import", "--model-dir", tmp_path / "nothing", "--out",
                           tmp_path / "x.npz")
    assert code == 2 and err.count("\n") == 1


def test_config_json_is_gpt2s_with_our_sizes_and_the_end_of_text_token(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, dtype="float64")
    export_gpt2(model, tokenizer, tmp_path)
    text = (tmp_path / "config.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and '\n  "model_type": "gpt2",\n' in text  # readable: one key a line
    assert json.loads(text) == {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": tokenizer.vocab_size,
        "n_positions": 16, "n_ctx": 16, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
        "scale_attn_weights": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 256, "eos_token_id": 256, "torch_dtype": "float64",
    }
    chars = CharTokenizer("abc")  # no special tokens: GPT-2's config then names none
    export_gpt2(tiny_model(vocab_size=chars.vocab_size), chars, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    imported, imported_chars = import_gpt2(tmp_path)
    assert imported_chars.decode(imported_chars.encode("cab")) == "cab"


def test_safetensors_layout_header_padded_to_8_bytes_tensors_in_order_little_endian(tmp_path):
    path = tmp_path / "x.safetensors"
    big_endian = np.arange(3, dtype=">f4")
    write_safetensors(path, {"b": np.ones((2, 2)), "a": big_endian}, {"k": "v"})
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    assert data[8 : 8 + length].rstrip(b" ") == json.dumps(header, separators=(",", ":")).encode()
    assert list(header) == ["__metadata__", "b", "a"] and header["__metadata__"] == {"k": "v"}
    assert header["b"] == {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 32]}
    assert header["a"] == {"dtype": "F32", "shape": [3], "data_offsets": [32, 44]}
    assert data[8 + length + 32 :] == np.arange(3, dtype="<f4").tobytes() and len(data) == 8 + length + 44
    tensors, metadata = read_safetensors(path)
    assert metadata == {"k": "v"} and list(tensors) == ["b", "a"]
    assert tensors["a"].dtype == np.dtype("<f4") and tensors["a"].tolist() == [0.0, 1.0, 2.0]
    assert not tensors["a"].flags.writeable  # views of the file's bytes
    with pytest.raises(ScratchLMError, match=r"^.*x.safetensors: tensor 'i' is int64$"):
        write_safetensors(path, {"i": np.arange(3)}, {})
    write_safetensors(path, {}, {})
    assert read_safetensors(path) == ({}, {})


def test_safetensors_errors_say_exactly_what_is_wrong(tmp_path):
    path = tmp_path / "bad.safetensors"

    def refused(content: bytes) -> str:
        path.write_bytes(content)
        with pytest.raises(ScratchLMError) as caught:
            read_safetensors(path)
        return str(caught.value).replace(str(path), "FILE")

    def entry_file(entry: dict, data: bytes, metadata=None) -> bytes:
        header = {"t": entry} if metadata is None else {"__metadata__": metadata, "t": entry}
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + data

    assert refused(b"1234567") == "FILE is truncated: 7 bytes, no header"
    assert refused((100_000_001).to_bytes(8, "little")) == "FILE: a 100000001-byte header? not safetensors"
    assert "not safetensors" not in refused((100_000_000).to_bytes(8, "little"))
    assert refused((10).to_bytes(8, "little") + b"{}") == "FILE is truncated: its header promises 10 bytes, 2 follow"
    assert refused((2).to_bytes(8, "little") + b"[]") == "FILE: the header is not a JSON object"
    assert refused((2).to_bytes(8, "little") + b"\xff}").startswith("FILE: the header is not JSON (")
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert refused(entry_file(f32, b"\0" * 8, {"a": 1})) == "FILE: __metadata__ must map strings to strings"
    assert refused(entry_file(f32, b"\0" * 8, ["a"])) == "FILE: __metadata__ must map strings to strings"
    assert refused(entry_file(f32, b"\0" * 4)) == ("FILE: tensor 't' ends at byte 8 of the data, which has only 4: "
                                                   "the file is truncated")
    assert refused(entry_file({**f32, "shape": [3]}, b"\0" * 8)) == "FILE: tensor 't' of shape [3] needs 12 bytes, has 8"
    assert refused(entry_file({**f32, "data_offsets": [4, 12]}, b"\0" * 12)) == (
        "FILE: tensor 't' starts at byte 4 of the data, not 0 (a gap or an overlap)")
    assert refused(entry_file(f32, b"\0" * 11)) == "FILE: 3 stray bytes after tensor 't'"
    assert refused(entry_file({**f32, "extra": 1}, b"\0" * 8)) == (
        "FILE: tensor 't' needs exactly dtype, shape and data_offsets")
    assert refused(entry_file({**f32, "dtype": "I8"}, b"\0" * 8)) == (
        "FILE: tensor 't' has dtype 'I8'; only F32 and F64 are read")
    for shape in ([2.0], [True], "2", [-1]):
        assert refused(entry_file({**f32, "shape": shape}, b"\0" * 8)) == (
            f"FILE: tensor 't' has a malformed shape {shape!r}")
    for offsets in ([0], [0, 8, 8], [8, 0], [0, -8], [0, 8.0], [False, 8], {"0": 8}):
        offsets_json = json.loads(json.dumps(offsets))
        assert refused(entry_file({**f32, "data_offsets": offsets}, b"\0" * 8)) == (
            f"FILE: tensor 't' has malformed data_offsets {offsets_json!r}")
    empty = {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}
    path.write_bytes(entry_file(empty, b""))
    tensors, metadata = read_safetensors(path)
    assert tensors["t"].shape == (0, 3) and metadata == {}
    assert refused((2).to_bytes(8, "little") + b"{}" + b"\0\0") == "FILE: 2 stray bytes after the header"


def test_two_tensors_may_not_share_bytes_and_must_tile_the_data_in_order(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {"second": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
              "first": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + np.array([1, 2], dtype="<f4").tobytes())
    tensors, _ = read_safetensors(path)
    assert tensors["first"].tolist() == [1.0] and tensors["second"].tolist() == [2.0]
    header["second"]["data_offsets"] = [0, 4]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + np.array([1, 2], dtype="<f4").tobytes())
    with pytest.raises(ScratchLMError, match="starts at byte 0 of the data, not 4"):
        read_safetensors(path)


def test_gpt2_names_cover_every_parameter_of_our_gpt(tokenizer):
    names = gpt2_names(2)
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    assert set(names) == set(model.params)
    assert names["wte.weight"] == "transformer.wte.weight" and names["ln_f.bias"] == "transformer.ln_f.bias"
    assert names["h.1.mlp.proj.weight"] == "transformer.h.1.mlp.c_proj.weight"
    assert names["h.0.attn.qkv.bias"] == "transformer.h.0.attn.c_attn.bias"
    assert len(set(names.values())) == len(names) == 4 + 2 * 12


def test_a_model_without_biases_exports_zero_biases_gpt2_can_load(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, bias=False, dtype="float64")
    export_gpt2(model, tokenizer, tmp_path)
    tensors, _ = read_safetensors(tmp_path / "model.safetensors")
    assert tensors["transformer.h.0.mlp.c_fc.bias"].shape == (64,)
    assert tensors["transformer.h.1.attn.c_attn.bias"].dtype == np.float64
    assert not tensors["transformer.h.0.attn.c_proj.bias"].any()


def test_import_errors_name_the_file_and_the_problem(tmp_path, tokenizer):
    with pytest.raises(ScratchLMError, match=f"^cannot read {re.escape(str(tmp_path / 'config.json'))}: "):
        import_gpt2(tmp_path)
    export_gpt2(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, tmp_path)
    config_path, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_bytes(b"\xff{}")
    with pytest.raises(ScratchLMError, match=f"^{re.escape(str(config_path))} is not JSON: "):
        import_gpt2(tmp_path)
    for change, message in [
        ({"model_type": None}, "model_type must be 'gpt2', got None"),
        ({"model_type": "llama"}, "model_type must be 'gpt2', got 'llama'"),
        ({"activation_function": "relu"}, "activation_function is 'relu'; our GPT computes only 'gelu_new'"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon is 1e-06; our GPT computes only 1e-05"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx is True"),
        ({"n_inner": 63}, "n_inner 63 is not 4 n_embd"),
        ({"n_embd": None}, "n_embd must be a positive integer, got None"),
        ({"n_embd": None, "n_inner": 64}, "n_embd must be a positive integer, got None"),
    ]:
        config_path.write_text(json.dumps({**config, **change}), encoding="utf-8")
        with pytest.raises(ScratchLMError) as caught:
            import_gpt2(tmp_path)
        assert str(caught.value).startswith(f"{config_path}: ") and message in str(caught.value)
    for accepted in ({"activation_function": "gelu_pytorch_tanh"}, {"n_inner": 64}, {"add_cross_attention": False}):
        config_path.write_text(json.dumps({**config, **accepted}), encoding="utf-8")
        import_gpt2(tmp_path)
    without = {k: v for k, v in config.items() if k not in ("n_inner", "activation_function", "layer_norm_epsilon")}
    config_path.write_text(json.dumps(without), encoding="utf-8")
    import_gpt2(tmp_path)  # absent settings mean GPT-2's defaults, which we compute
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "n_head"}), encoding="utf-8")
    with pytest.raises(ScratchLMError, match="^.*config.json: n_head is missing$"):
        import_gpt2(tmp_path)
    config_path.write_text(json.dumps([config]), encoding="utf-8")
    with pytest.raises(ScratchLMError, match="model_type must be 'gpt2', got "):
        import_gpt2(tmp_path)
    config_path.write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}), encoding="utf-8")
    with pytest.raises(ScratchLMError, match="wte.weight"):
        import_gpt2(tmp_path)


def test_import_refuses_a_tokenizer_that_disagrees_with_the_model(tmp_path, tokenizer):
    chars = CharTokenizer("abcdef")
    export_gpt2(tiny_model(vocab_size=tokenizer.vocab_size), chars, tmp_path)
    with pytest.raises(ScratchLMError) as caught:
        import_gpt2(tmp_path)
    assert str(caught.value) == (f"{tmp_path / 'model.safetensors'}: its tokenizer has {chars.vocab_size} tokens, "
                                 f"config.json says {tokenizer.vocab_size}")
    tensors, metadata = read_safetensors(tmp_path / "model.safetensors")
    write_safetensors(tmp_path / "model.safetensors", tensors, {**metadata, "scratchlm.tokenizer": "{"})
    with pytest.raises(ScratchLMError, match="no usable scratchlm.tokenizer in its metadata"):
        import_gpt2(tmp_path)


def test_export_and_import_commands_print_what_they_wrote(capsys, tmp_path, model_file):
    out_dir = tmp_path / "hf"
    code, out, _ = run_cli(capsys, "export", "--model", model_file, "--out", out_dir)
    sizes = {name: (out_dir / name).stat().st_size for name in ("model.safetensors", "config.json")}
    assert code == 0 and out == "".join(f"{out_dir / name}  {size:,} bytes\n" for name, size in sizes.items())
    code, out, _ = run_cli(capsys, "export", "--model", model_file, "--out", out_dir, "--json")
    assert json.loads(out) == {"out": str(out_dir), "files": sizes}
    back = tmp_path / "back.npz"
    code, out, _ = run_cli(capsys, "import", "--model-dir", out_dir, "--out", back, "--json")
    summary = json.loads(out)
    model, _, meta = load_model(back)
    assert code == 0 and summary["out"] == str(back) and summary["n_params"] == model.n_params
    assert len(summary["sha256"]) == 64 and meta["imported_from"] == str(out_dir)
    code, out, _ = run_cli(capsys, "import", "--model-dir", out_dir, "--out", back)
    assert code == 0 and out == f"{back}: {model.n_params:,} parameters from {out_dir}\n"


@pytest.mark.parametrize("argv", [["export", "--out", "d"], ["export", "--model", "m.npz"],
                                  ["import", "--out", "m.npz"], ["import", "--model-dir", "d"]])
def test_export_and_import_need_both_their_paths(capsys, argv):
    from scratchlm.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2 and "required" in capsys.readouterr().err


def test_every_header_is_padded_with_spaces_to_a_multiple_of_8_bytes(tmp_path):
    path = tmp_path / "x.safetensors"
    for i in range(16):
        write_safetensors(path, {"t": np.ones(2, dtype=np.float32)}, {"k": "v" * i})
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        assert length % 8 == 0 and len(data) == 8 + length + 8
        assert json.loads(data[8 : 8 + length])["__metadata__"] == {"k": "v" * i}
        assert data[8 : 8 + length].endswith(b"}" + b" " * (length - len(data[8 : 8 + length].rstrip())))


def test_a_zero_size_tensor_may_come_first_in_the_header(tmp_path):
    header = {"empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
              "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    tensors, _ = read_safetensors(raw_file(tmp_path / "x.safetensors", header, np.ones(2, "<f4").tobytes()))
    assert tensors["empty"].shape == (0,) and tensors["t"].tolist() == [1.0, 1.0]


def test_a_wrongly_sized_tensor_after_another_reports_its_own_size(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [4, 12]}}
    with pytest.raises(ScratchLMError, match=r"tensor 'b' of shape \[3\] needs 12 bytes, has 8$"):
        read_safetensors(raw_file(tmp_path / "x.safetensors", header, b"\0" * 12))


def test_the_first_key_found_twice_is_named(tmp_path):
    text = b'{"a":{},"b":{},"a":{},"b":{}}'
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(ScratchLMError, match="'a' appears twice in the header"):
        read_safetensors(path)


def test_import_without_the_token_embedding_names_it(tmp_path, tokenizer):
    export_gpt2(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors, metadata = read_safetensors(weights)
    write_safetensors(weights, {k: v for k, v in tensors.items() if k != "transformer.wte.weight"}, metadata)
    with pytest.raises(ScratchLMError, match=r"'transformer.wte.weight' should be float32\[300, 16\], got missing"):
        import_gpt2(tmp_path)


def test_every_option_of_the_export_commands_says_what_it_does_in_help():
    assert_documented("export", "import", "evaluate")


# ---- what the mutation run of generate asked for ---------------------------------------


def test_the_documented_default_sampling_and_accepted_edge_settings():
    assert SamplingConfig() == SamplingConfig(1.0, None, None)
    for good in (dict(temperature=0), dict(temperature=3), dict(top_k=1), dict(top_p=1),
                 dict(top_p=1e-9), dict(temperature=0.5, top_k=2, top_p=0.9)):
        SamplingConfig(**good)  # accepted: no error
    for bad, name in ((dict(temperature="1"), "temperature"), (dict(top_k=-3), "top_k"),
                      (dict(top_p=-0.5), "top_p"), (dict(top_p=True), "top_p"),
                      (dict(top_p="0.5"), "top_p"), (dict(temperature=None), "temperature")):
        with pytest.raises(ScratchLMError, match=name):
            SamplingConfig(**bad)


def test_probabilities_are_float64_and_need_one_row():
    probs = next_token_probs(LOGITS.astype(np.float16), SamplingConfig(temperature=0.7))
    assert probs.dtype == np.float64 and probs.shape == (8,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    for config in (SamplingConfig(), SamplingConfig(temperature=0), SamplingConfig(top_k=2)):
        with pytest.raises(ScratchLMError, match="one row"):
            next_token_probs(LOGITS[None, :], config)
    greedy = next_token_probs(np.array([0.0, 5.0, 1.0], dtype=np.float32), SamplingConfig(temperature=0))
    assert greedy.dtype == np.float64 and greedy.tolist() == [0.0, 1.0, 0.0]


def test_top_k_keeps_exactly_the_k_likeliest():
    logits = np.array([0.3, 2.0, -1.0, 1.5, 0.9])
    for k, kept in ((1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (4, {0, 1, 3, 4})):
        probs = next_token_probs(logits, SamplingConfig(top_k=k))
        assert set(np.flatnonzero(probs).tolist()) == kept
        expected = np.exp(logits[sorted(kept)]) / np.exp(logits[sorted(kept)]).sum()
        np.testing.assert_allclose(probs[sorted(kept)], expected)


def test_sample_token_draws_from_probs_with_the_generator_given():
    probs = np.array([0.0, 0.0, 1.0, 0.0])
    assert all(sample_token(probs, np.random.default_rng(s)) == 2 for s in range(5))
    token = sample_token(np.full(5, 0.2), np.random.default_rng(1))
    assert type(token) is int
    assert token == sample_token(np.full(5, 0.2), np.random.default_rng(1))


def test_cache_shapes_and_batches():
    config = GPTConfig(300, 16, 3, 2, 16, dtype="float64")
    cache = KVCache(config)
    assert cache.keys.shape == cache.values.shape == (3, 1, 2, 16, 8)
    assert cache.keys.dtype == np.float64 and cache.length == 0
    assert KVCache(config, batch=4).keys.shape == (3, 4, 2, 16, 8)
    assert KVCache(GPTConfig(300, 16, 1, 4, 16)).bytes_per_token() == 2 * 1 * 16 * 4
    model = tiny_model()
    with pytest.raises(ScratchLMError, match="a batch of 2 sequences for a cache of 1"):
        forward_cached(model, np.zeros((2, 3), dtype=np.int64), KVCache(model.config))
    cache = KVCache(model.config)
    forward_cached(model, np.zeros((1, 5), dtype=np.int64), cache)
    assert cache.length == 5
    with pytest.raises(ScratchLMError, match="the cache holds 5 tokens: 12 more do not fit"):
        forward_cached(model, np.zeros((1, 12), dtype=np.int64), cache)
    forward_cached(model, np.zeros((1, 11), dtype=np.int64), cache)  # exactly fills the block
    assert cache.length == 16


def count_forwards(model):
    """The model, with a list that grows by one entry each time it computes logits."""
    calls, head = [], model.head

    def counted(*args, **kwargs):
        calls.append(1)
        return head(*args, **kwargs)

    model.head = counted
    return calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_nothing_is_computed_beyond_the_tokens_asked_for(use_cache):
    model = tiny_model()
    calls = count_forwards(model)
    tokens = list(generate(model, [1, 2], rng=np.random.default_rng(0), max_new_tokens=4,
                           use_cache=use_cache))
    assert len(tokens) == 4 and len(calls) == 4  # one set of logits per token yielded
    calls.clear()
    stream = generate(model, [1, 2], rng=np.random.default_rng(0), max_new_tokens=4,
                      use_cache=use_cache)
    next(stream)
    assert len(calls) == 1


def replay(model, prompt, contexts, n, seed):
    """Sampling done by hand: token i is drawn from the model's logits on ``contexts(ids, i)``."""
    rng, ids, tokens = np.random.default_rng(seed), list(prompt), []
    for i in range(n):
        logits = model.forward(np.asarray([contexts(ids, i)]))[0, -1]
        tokens.append(sample_token(next_token_probs(logits, SamplingConfig()), rng))
        ids.append(tokens[-1])
    return tokens


def test_with_the_cache_a_full_block_keeps_its_last_half():
    """The documented cropping: once the block is full, the model sees the last block // 2."""
    model = tiny_model(dtype="float64")
    tokens = list(generate(model, [7], rng=np.random.default_rng(0), max_new_tokens=40))
    # the first 15 new tokens see the whole context; then the context is rebuilt from
    # the last 8 tokens and grows again until the block is full once more (every 9 tokens)
    seen = [1 + i if i < 16 else 8 + (i - 16) % 9 for i in range(40)]
    assert tokens == replay(model, [7], lambda ids, i: ids[-seen[i]:], 40, seed=0)


def test_a_one_token_block_still_generates_with_the_cache():
    config = GPTConfig(300, 1, 1, 2, 16)
    model = GPT(config, rng=np.random.default_rng(0))
    greedy = SamplingConfig(temperature=0)
    runs = [list(generate(model, [5, 6], rng=np.random.default_rng(0), sampling=greedy,
                          max_new_tokens=5, use_cache=use_cache)) for use_cache in (True, False)]
    assert runs[0] == runs[1] and len(runs[0]) == 5


def test_stop_tokens_may_be_any_iterable_and_only_they_stop():
    model = tiny_model()
    greedy = SamplingConfig(temperature=0)
    free = list(generate(model, [1], rng=np.random.default_rng(0), sampling=greedy,
                         max_new_tokens=12))
    never = next(t for t in range(300) if t not in free)
    assert list(generate(model, [1], rng=np.random.default_rng(0), sampling=greedy,
                         max_new_tokens=12, stop_tokens=iter([never]))) == free
    stopped = list(generate(model, [1], rng=np.random.default_rng(0), sampling=greedy,
                            max_new_tokens=12, stop_tokens=(free[2], never)))
    assert stopped == free[: free.index(free[2]) + 1]
    for bad in (2.0, True, "3"):
        with pytest.raises(ScratchLMError, match="max_new_tokens"):
            next(generate(model, [1], rng=np.random.default_rng(0), max_new_tokens=bad))
    assert len(list(generate(model, [1], rng=np.random.default_rng(0), max_new_tokens=1))) == 1


def test_benchmark_reports_both_runs_token_by_token():
    from scratchlm.generate import benchmark

    model = tiny_model()
    start = time.perf_counter()
    result = benchmark(model, new_tokens=5, prompt_ids=[3, 4])
    elapsed = time.perf_counter() - start
    assert result["new_tokens"] == 5 and result["same_tokens"] is True
    for name in ("cached", "uncached"):
        seconds = result[f"{name}_seconds"]
        assert len(seconds) == 5 and all(b >= a > 0 for a, b in zip(seconds, seconds[1:]))
        assert seconds[-1] < elapsed  # each token's arrival, counted from the start
        assert result[f"{name}_tokens_per_second"] == pytest.approx(5 / seconds[-1])
    assert result["speedup"] == pytest.approx(
        result["cached_tokens_per_second"] / result["uncached_tokens_per_second"])
    assert benchmark(model, new_tokens=20)["same_tokens"] is False  # past the block they differ


def test_incomplete_tail_for_every_length_of_character():
    for char in ("a", "é", "\u07ff", "\u0800", "€", "\uffff", "😀", "\U0010ffff"):
        data = char.encode()
        for cut in range(1, len(data)):
            assert incomplete_tail(b"x" + data[:cut]) == cut, (char, cut)
            assert incomplete_tail(data[:cut]) == cut, (char, cut)
        assert incomplete_tail(b"x" + data) == 0 and incomplete_tail(data) == 0
    assert incomplete_tail("😀".encode() + "€".encode()[:2]) == 2
    assert incomplete_tail(b"\x80\x80\x80\xf0") == 1
    assert incomplete_tail(b"\xf0\x80\x80\x80") == 0  # a whole four-byte character's shape
    assert incomplete_tail(b"\x80" * 4) == 0


def test_text_stream_with_a_character_tokenizer_and_after_a_flush():
    chars = CharTokenizer.from_text("héllo €")
    stream = TextStream(chars)
    assert "".join(stream.push(t) for t in chars.encode("€ hé")) == "€ hé"
    assert stream.flush() == ""
    tok = byte_tokenizer()
    stream = TextStream(tok)
    assert stream.push("€".encode()[0]) == "" and stream.flush() == "\ufffd"
    assert stream.flush() == ""  # nothing is left over after a flush
    assert stream.push(ord("a")) == "a"


def test_encode_prompt_refuses_empty_text_and_special_tokens_unless_allowed(tokenizer):
    from scratchlm.generate import encode_prompt

    with pytest.raises(ScratchLMError, match="empty"):
        encode_prompt(tokenizer, "")
    chars = CharTokenizer.from_text("abc")
    assert encode_prompt(chars, "cab") == chars.encode("cab").tolist()
    assert isinstance(encode_prompt(chars, "cab"), list)
    assert encode_prompt(tokenizer, "x <|endoftext|>", allow_special=True)[-1] == 256
    with pytest.raises(ScratchLMError, match="special"):
        encode_prompt(tokenizer, "x <|endoftext|>")


def test_evaluate_counts_tokens_and_utf8_bytes(tokenizer):
    from scratchlm.generate import evaluate

    model = tiny_model(vocab_size=tokenizer.vocab_size)
    text = TEXT[:120]
    result = evaluate(model, tokenizer, text)
    ids = tokenizer.encode(text)
    assert result["tokens"] == len(ids) and result["bytes"] == len(text.encode("utf-8"))
    assert result["bytes"] > len(text)  # the text is not ASCII
    assert result["loss"] == pytest.approx(sequence_nll(model, np.asarray(ids)) / (len(ids) - 1))
    assert set(result) == {"tokens", "bytes", "loss", "bits_per_byte"}


def saying_always(tokenizer, token, path):
    """A model file whose next token is ``token``, whatever the prompt."""
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    model.params["ln_f.weight"][...] = 0.0
    model.params["ln_f.bias"][...] = 1.0
    model.params["wte.weight"][token] += 5.0
    save_model(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def stopping_model_file(tmp_path_factory, tokenizer):
    """A model that always says <|endoftext|> (id 256) next, whatever the prompt."""
    return saying_always(tokenizer, 256, tmp_path_factory.mktemp("stopping") / "stop.npz")


def test_generate_cli_stops_at_a_special_token_without_printing_it(capsys, stopping_model_file):
    args = ("generate", "--model", stopping_model_file, "--prompt", "The", "--max-new-tokens", 5)
    code, out, err = run_cli(capsys, *args, "--json")
    result = json.loads(out)
    assert code == 0 and result["finish_reason"] == "stop" and result["tokens"] == []
    assert result["text"] == "" and result["prompt"] == "The" and result["seconds"] >= 0
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and out == "The\n" and err == ""


def test_generate_cli_json_and_text_agree(capsys, model_file, tokenizer):
    args = ("generate", "--model", model_file, "--prompt", "naïve", "--max-new-tokens", 6,
            "--seed", 1, "--temperature", 0.9, "--top-k", 40, "--top-p", 0.95)
    code, out, err = run_cli(capsys, *args, "--json")
    result = json.loads(out)
    assert code == 0 and err == "" and out.count("\n") == 1
    assert result["finish_reason"] in ("length", "stop") and "naïve" in out  # not escaped
    expected = list(generate(load_model(model_file)[0], tokenizer.encode("naïve"),
                             rng=np.random.default_rng(1),
                             sampling=SamplingConfig(0.9, 40, 0.95), max_new_tokens=6))
    stops = set(tokenizer.special_tokens.values())
    if result["finish_reason"] == "length":
        assert result["tokens"] == expected
    else:
        assert result["tokens"] == expected[:-1] and expected[-1] in stops
    assert result["text"] == tokenizer.decode(result["tokens"])
    code, out, _ = run_cli(capsys, *args)
    assert out == "naïve" + result["text"] + "\n"
    code, out, _ = run_cli(capsys, "generate", "--model", model_file, "--prompt", "a",
                           "--max-new-tokens", 0, "--json")
    assert code == 0 and json.loads(out)["tokens"] == []
    code, _, err = run_cli(capsys, "generate", "--prompt", "a")
    assert code == 2 and "--model" in err


def test_generate_cli_defaults(capsys, model_file, tokenizer):
    code, out, _ = run_cli(capsys, "generate", "--model", model_file, "--prompt", "The", "--json")
    result = json.loads(out)
    expected = list(generate(load_model(model_file)[0], tokenizer.encode("The"),
                             rng=np.random.default_rng(0), max_new_tokens=200))
    stops = set(tokenizer.special_tokens.values())
    cut = next((i for i, t in enumerate(expected) if t in stops), len(expected))
    assert result["tokens"] == expected[:cut]


def test_generate_bench_cli_text_and_refusals(capsys, model_file):
    code, out, _ = run_cli(capsys, "generate", "bench", "--model", model_file, "--new-tokens", 3)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("3 new tokens, greedy, ")
    assert f"{load_model(model_file)[0].n_params:,} parameters" in lines[0]
    assert "without the cache" in lines[1] and "with the cache" in lines[2]
    assert "speed-up" in lines[3] and "same tokens: True" in lines[3]
    code, _, err = run_cli(capsys, "generate", "bench", "--new-tokens", 0)
    assert code == 2 and "--new-tokens" in err and err.count("\n") == 1
    code, out, _ = run_cli(capsys, "generate", "bench", "--new-tokens", 1, "--json")
    result = json.loads(out)
    assert code == 0 and result["new_tokens"] == 1 and not any("seconds" in k for k in result)


def test_evaluate_cli_text_output(capsys, tmp_path, model_file):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT[:200], encoding="utf-8")
    code, out, _ = run_cli(capsys, "evaluate", "--model", model_file, "--text-file", text_file)
    model, tok, _ = load_model(model_file)
    result = json.loads(run_cli(capsys, "evaluate", "--model", model_file, "--text-file",
                                text_file, "--json")[1])
    assert code == 0 and out == (
        f"{result['tokens']:,} tokens, {result['bytes']:,} bytes: loss "
        f"{result['loss']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte\n")


def test_generate_and_evaluate_options_parse_to_their_documented_defaults():
    from scratchlm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate"])
    assert (args.model, args.prompt, args.temperature, args.top_k, args.top_p, args.seed,
            args.max_new_tokens, args.allow_special, args.no_cache, args.json) == (
        None, None, 1.0, None, None, 0, 200, False, False, False)
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--temperature", "0.5",
                              "--top-k", "3", "--top-p", "0.9", "--seed", "4",
                              "--max-new-tokens", "7", "--allow-special", "--no-cache", "--json"])
    assert (args.model, args.prompt, args.temperature, args.top_k, args.top_p, args.seed,
            args.max_new_tokens, args.allow_special, args.no_cache, args.json) == (
        "m", "p", 0.5, 3, 0.9, 4, 7, True, True, True)
    args = parser.parse_args(["generate", "bench"])
    assert (args.model, args.new_tokens, args.json) == (None, 256, False)
    args = parser.parse_args(["generate", "bench", "--model", "m", "--new-tokens", "9", "--json"])
    assert (args.model, args.new_tokens, args.json) == ("m", 9, True)
    args = parser.parse_args(["evaluate", "--model", "m", "--text-file", "t"])
    assert (args.model, args.text_file, args.json) == ("m", "t", False)
    assert parser.parse_args(["evaluate", "--model", "m", "--text-file", "t", "--json"]).json
    for argv in (["evaluate", "--model", "m"], ["evaluate", "--text-file", "t"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_every_option_of_generate_and_evaluate_says_what_it_does_in_help():
    import argparse

    from scratchlm.cli import build_parser

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in top._choices_actions}
    assert "chapter 7" in helps["generate"] and "chapter 7" in helps["evaluate"]
    generate_parser = top.choices["generate"]
    assert "Ctrl-C" in generate_parser.description
    bench_action = next(a for a in generate_parser._actions
                        if isinstance(a, argparse._SubParsersAction))
    assert next(c.help for c in bench_action._choices_actions if c.dest == "bench")
    for parser in (generate_parser, bench_action.choices["bench"], top.choices["evaluate"]):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.dest not in ("seed", "max_new_tokens", "new_tokens"):
                assert action.help, action.option_strings


def test_generate_defaults_to_256_tokens_and_needs_a_prompt_token():
    model = tiny_model()
    assert len(list(generate(model, [1], rng=np.random.default_rng(0)))) == 256
    with pytest.raises(ScratchLMError, match="need at least 1 token"):
        next(generate(model, [], rng=np.random.default_rng(0)))


def test_without_the_cache_the_model_always_sees_the_last_block():
    model = tiny_model(dtype="float64")
    tokens = list(generate(model, [7, 3], rng=np.random.default_rng(1), max_new_tokens=30,
                           use_cache=False))
    assert tokens == replay(model, [7, 3], lambda ids, i: ids[-16:], 30, seed=1)


def test_top_p_ties_are_ranked_by_position_in_a_large_vocabulary():
    probs = next_token_probs(np.zeros(1000), SamplingConfig(top_p=0.25))
    assert np.flatnonzero(probs).tolist() == list(range(250))


def test_benchmark_defaults_to_256_tokens():
    from scratchlm.generate import benchmark

    result = benchmark(tiny_model())
    assert result["new_tokens"] == 256 and len(result["cached_seconds"]) == 256


def test_top_k_keeps_the_k_largest_of_a_large_vocabulary():
    logits = np.random.default_rng(0).normal(size=1000)
    probs = next_token_probs(logits, SamplingConfig(top_k=10))
    assert set(np.flatnonzero(probs).tolist()) == set(np.argsort(logits)[-10:].tolist())


class InterruptedTerminal:
    """A stdout that records what is written and flushed, and can deliver one Ctrl-C."""

    def __init__(self, interrupt_at=None):
        self.written, self.shown, self.interrupt_at = [], "", interrupt_at

    def write(self, text):
        if text and self.interrupt_at is not None and len(self.written) == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        self.written.append(text)
        return len(text)

    def flush(self):
        self.shown = "".join(self.written)

    def isatty(self):
        return False


def test_generate_cli_shows_each_piece_as_it_comes(capsys, monkeypatch, model_file):
    terminal = InterruptedTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    shown_after_each_write = []
    original_write = terminal.write

    def write(text):
        if text:
            shown_after_each_write.append((terminal.shown, "".join(terminal.written)))
        return original_write(text)

    terminal.write = write
    code = main(["generate", "--model", str(model_file), "--prompt", "The", "--max-new-tokens", "8"])
    assert code == 0
    # before anything new is written, everything written so far is on the screen
    assert len(shown_after_each_write) >= 3
    for shown, written in shown_after_each_write[:-1]:  # the last is print's own end="\n"
        assert shown == written
    assert terminal.shown == "".join(terminal.written)
    assert terminal.shown.startswith("The") and terminal.shown.endswith("\n")


@pytest.fixture(scope="module")
def chars_model_file(tmp_path_factory):
    chars = CharTokenizer.from_text(TEXT)  # no special tokens: only the length stops it
    path = tmp_path_factory.mktemp("chars") / "chars.npz"
    save_model(path, tiny_model(vocab_size=chars.vocab_size), chars)
    return path


def test_ctrl_c_stops_generation_in_process(capsys, monkeypatch, chars_model_file):
    terminal = InterruptedTerminal(interrupt_at=4)
    monkeypatch.setattr(sys, "stdout", terminal)
    code = main(["generate", "--model", str(chars_model_file), "--prompt", "The",
                 "--max-new-tokens", "50"])
    err = capsys.readouterr().err
    assert code == 130
    assert re.fullmatch(r"interrupted after \d+ tokens\n", err), err
    n = int(err.split()[2])
    assert 1 <= n < 50 and "".join(terminal.written).startswith("The")
    assert "".join(terminal.written).endswith("\n")


def test_generate_cli_uses_the_cache_unless_told_not_to(capsys, chars_model_file):
    model, chars, _ = load_model(chars_model_file)
    args = ("generate", "--model", chars_model_file, "--prompt", "The", "--max-new-tokens", 40,
            "--json", "--seed", 2)
    for extra, use_cache in (((), True), (("--no-cache",), False)):
        result = json.loads(run_cli(capsys, *args, *extra)[1])
        expected = list(generate(model, chars.encode("The"), rng=np.random.default_rng(2),
                                 max_new_tokens=40, use_cache=use_cache))
        assert result["tokens"] == expected and result["finish_reason"] == "length"
        assert result["text"] == chars.decode(expected)
    assert json.loads(run_cli(capsys, *args)[1]) != json.loads(run_cli(capsys, *args, "--no-cache")[1])


def test_generate_cli_prints_a_character_cut_short_at_the_end(capsys, tokenizer, tmp_path):
    euro_start = "€".encode()[0]  # a byte token that only ever begins a character
    path = saying_always(tokenizer, euro_start, tmp_path / "euro.npz")
    args = ("generate", "--model", path, "--prompt", "a", "--max-new-tokens", 3)
    result = json.loads(run_cli(capsys, *args, "--json")[1])
    assert result["tokens"] == [euro_start] * 3
    assert run_cli(capsys, *args)[1] == "a" + result["text"] + "\n" == "a\ufffd\ufffd\ufffd\n"


def test_generate_cli_reports_its_time_in_milliseconds(capsys, model_file):
    start = time.perf_counter()
    code, out, _ = run_cli(capsys, "generate", "--model", model_file, "--prompt", "The",
                           "--max-new-tokens", 30, "--json", "--no-cache")
    elapsed = time.perf_counter() - start
    seconds = json.loads(out)["seconds"]
    assert type(seconds) is float and 0 <= seconds <= elapsed
    assert seconds == round(seconds, 3)


def test_generate_cli_crops_only_a_prompt_longer_than_the_block(capsys, model_file, tokenizer):
    lengths = {}
    for end in range(1, len(TEXT)):
        lengths.setdefault(len(tokenizer.encode(TEXT[:end])), TEXT[:end])
    for n_tokens, cropped in ((16, False), (17, True)):
        code, out, err = run_cli(capsys, "generate", "--model", model_file, "--prompt",
                                 lengths[n_tokens], "--max-new-tokens", 1, "--json")
        result = json.loads(out)
        assert result["prompt_tokens"] == n_tokens and result["cropped"] is cropped
        assert ("sees the last 16" in err) is cropped
