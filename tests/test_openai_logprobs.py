"""Log-probabilities on the OpenAI server, driven by the official ``openai`` client: both endpoints,
streamed and not, every mode, stop strings, bad values. A real server process on loopback (the
trained demo model with a chat template, CPU, float32)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install '.[test]')")
pytest.importorskip("fastapi", reason="fastapi/uvicorn not installed (pip install '.[serve]')")

from trtllm_twotower.demo import TRAINED_DEMO_DIR  # noqa: E402
from trtllm_twotower.hf_reference import transformers_context_model  # noqa: E402
from trtllm_twotower.runtime import TwoTowerRuntime  # noqa: E402
from serving_process import start_openai_server, stop_server, with_chat_template  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KNOBS = dict(block_size=8, steps_per_block=4, confidence_threshold=0.5)
MODES = ["diffusion", "speculative", "ar", "mock-ar"]
PROMPT = "Return a new list of"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The trained demo model with a chat template in its tokenizer config."""
    directory = tmp_path_factory.mktemp("lp") / "demo"
    shutil.copytree(TRAINED_DEMO_DIR, directory)
    return with_chat_template(directory)


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    proc, port = start_openai_server(tmp_path_factory.mktemp("lp_log") / "server.log", "--checkpoint", str(checkpoint),
                                     "--served-model-name", "demo", "--default-temperature", "0")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    stop_server(proc)


@pytest.fixture(scope="module")
def runtime(checkpoint):
    return TwoTowerRuntime.from_checkpoint(checkpoint, dtype="float32")


def completion(client, mode: str = "ar", **kw):
    return client.completions.create(model="demo", prompt=kw.pop("prompt", PROMPT), max_tokens=kw.pop("max_tokens", 24),
                                     extra_body={**KNOBS, "mode": mode}, **kw)


def check_completion_logprobs(logprobs, ids: list[int], text: str, count: int, tokenizer, greedy: bool) -> None:
    """OpenAI's completions object over ``ids`` (all of them: no stop string cut them)."""
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(ids)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert logprobs.text_offset == [len(tokenizer.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]
    visible = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]  # EOS reads "</s>" but adds no text
    assert all(text.startswith(piece, offset) for piece, offset in zip(visible, logprobs.text_offset)
               if piece.isascii() and piece.isprintable())
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == chosen  # the chosen token is always there (OpenAI's "up to logprobs + 1")
        values = list(top.values())
        best = values[:count] if len(top) > count else values  # the N most likely come first, sorted
        assert best == sorted(best, reverse=True) and count <= len(top) <= count + 1
        if greedy:
            assert chosen == max(values)


@pytest.mark.parametrize("mode", MODES)
def test_completions_logprobs_in_every_mode(client, runtime, mode):
    count = random.randint(0, 5)
    temperature = random.choice([0.0, 0.7])
    seed = random.randrange(1000)
    reply = completion(client, mode, logprobs=count, temperature=temperature, seed=seed)
    choice = reply.choices[0]
    check_completion_logprobs(choice.logprobs, choice.token_ids, choice.text, count, runtime.tokenizer,
                              temperature == 0)
    ref = runtime.generate([PROMPT], max_new_tokens=24, mode=mode, temperature=temperature, seed=seed, logprobs=count,
                           **KNOBS)
    assert choice.token_ids == ref.output_ids[0]
    assert choice.logprobs.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs[0]], abs=1e-5)
    plain = completion(client, mode, temperature=temperature, seed=seed).choices[0]
    assert plain.logprobs is None and plain.token_ids == choice.token_ids and plain.text == choice.text


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_ar_logprobs_are_the_log_softmax_of_the_context_towers_logits(client, runtime, temperature):
    """AR mode: each token's logprob and top-5 equal log_softmax(logits / T) (T = 1 when greedy) of
    transformers' NemotronH run over prompt + output in one forward, in fp32. Tolerance: the two
    models' logits agree to 1e-4 of their scale (test_context_tower), so log-probs to 2e-4 x scale / T."""
    seed = random.randrange(1000)
    choice = completion(client, "ar", max_tokens=32, logprobs=5, temperature=temperature, seed=seed).choices[0]
    prompt = runtime.tokenizer.encode(PROMPT)
    model = transformers_context_model(runtime.checkpoint_dir, runtime.executor.ctx_weights)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + choice.token_ids])).logits[0].float()  # [S, V]
    T = temperature or 1.0
    expected = torch.log_softmax(logits[len(prompt) - 1: -1] / T, dim=-1)  # position i predicts token i + 1
    tolerance = 2e-4 * logits.abs().max().item() / T
    chosen = expected.gather(-1, torch.tensor(choice.token_ids)[:, None])[:, 0]
    assert choice.logprobs.token_logprobs == pytest.approx(chosen.tolist(), abs=tolerance)
    for top, row in zip(choice.logprobs.top_logprobs, expected):
        best = row.topk(5).values.tolist()
        assert list(top.values())[:5] == pytest.approx(best, abs=tolerance)


def test_chat_logprobs_name_tokens_bytes_and_n_alternatives(client, runtime):
    count = random.randint(1, 20)
    messages = [{"role": "user", "content": "Create a new"}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=20, logprobs=True,
                                           top_logprobs=count, extra_body={**KNOBS, "mode": "speculative"})
    choice = reply.choices[0]
    content = choice.logprobs.content
    ids = choice.model_extra["token_ids"]
    assert len(content) == len(ids)
    for entry, token in zip(content, ids):
        assert entry.token == runtime.tokenizer.decode([token])
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or token in (0, 1, 2, 3)
        assert len(entry.top_logprobs) == count
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob == values[0]  # greedy (the default)
        assert entry.top_logprobs[0].token == entry.token
    without = client.chat.completions.create(model="demo", messages=messages, max_tokens=20,
                                             extra_body={**KNOBS, "mode": "speculative"}).choices[0]
    assert without.logprobs is None and without.message.content == choice.message.content
    only = client.chat.completions.create(model="demo", messages=messages, max_tokens=4, logprobs=True,
                                          extra_body=KNOBS).choices[0]
    assert all(entry.top_logprobs == [] for entry in only.logprobs.content) and len(only.logprobs.content) == 4


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_streamed_logprobs_are_the_whole_replys(client, mode):
    """Each chunk carries the entries of its tokens (held back with text held back); together they
    are the non-streamed reply's, in both endpoints."""
    whole = completion(client, mode, max_tokens=30, logprobs=3).choices[0].logprobs
    chunks = [c.choices[0] for c in completion(client, mode, max_tokens=30, logprobs=3, stream=True) if c.choices]
    joined = {name: sum((getattr(c.logprobs, name) for c in chunks if c.logprobs), [])
              for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == {name: getattr(whole, name) for name in joined}
    sent = released = 0
    for c in chunks:  # never ahead of the tokens
        sent, released = sent + len(c.token_ids), released + (len(c.logprobs.tokens) if c.logprobs else 0)
        assert released <= sent
    messages = [{"role": "user", "content": "The file is"}]
    kw = dict(model="demo", messages=messages, max_tokens=30, logprobs=True, top_logprobs=2,
              extra_body={**KNOBS, "mode": mode})
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == whole


@pytest.mark.parametrize("mode", MODES)
def test_a_stop_string_cuts_the_logprobs_as_the_text(client, runtime, mode):
    """Entries are kept for the tokens that start before the cut, streamed or not."""
    full = completion(client, mode, max_tokens=40).choices[0]
    at = random.randrange(1, len(full.text) - 4)
    stop = full.text[at: at + 3]
    cut = full.text.find(stop)
    kw = dict(max_tokens=40, logprobs=2, stop=[stop])
    choice = completion(client, mode, **kw).choices[0]
    assert choice.text == full.text[:cut]
    ids = choice.token_ids
    starts = [len(runtime.tokenizer.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]
    assert choice.logprobs.text_offset == [s for s in starts if s < cut]
    chunks = [c.choices[0] for c in completion(client, mode, stream=True, **kw) if c.choices]
    assert sum((c.logprobs.tokens for c in chunks if c.logprobs), []) == choice.logprobs.tokens


@pytest.mark.parametrize("endpoint, body, param, message", [
    ("completions", {"logprobs": 6}, "logprobs", "logprobs: expected an integer in [0, 5] or null, got 6"),
    ("completions", {"logprobs": -1}, "logprobs", "logprobs: expected an integer in [0, 5]"),
    ("completions", {"logprobs": True}, "logprobs", "logprobs: expected an integer in [0, 5]"),
    ("completions", {"top_logprobs": 2}, "top_logprobs", "unknown field(s) 'top_logprobs'"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "top_logprobs: expected an integer in [0, 20], got 21"),
    ("chat", {"logprobs": 1}, "logprobs", "logprobs: expected true or false, got 1"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", "top_logprobs: needs \"logprobs\": true"),
    ("chat", {"logprobs": False, "top_logprobs": 3}, "top_logprobs", "top_logprobs: needs \"logprobs\": true"),
])
def test_bad_logprobs_values_are_refused(client, endpoint, body, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "completions":
            client.completions.create(model="demo", prompt="x", max_tokens=2, extra_body=body)
        else:
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                           extra_body=body)
    error = err.value.body
    assert message in error["message"] and error["param"] == param
