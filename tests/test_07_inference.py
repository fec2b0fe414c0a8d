"""Chapter 7: sampling, the KV cache, streaming text, the CLI, and the GPT-2 export."""

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
