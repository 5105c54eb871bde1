"""The OpenAI-compatible server, started as users start it, driven by the official ``openai`` client
and by raw concurrent streams (the in-flight batching load tests). CPU, demo checkpoint, loopback."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install '.[test]')")
pytest.importorskip("fastapi", reason="fastapi/uvicorn not installed (pip install '.[serve]')")

from trtllm_twotower.demo import write_demo_checkpoint  # noqa: E402
from trtllm_twotower.runtime import TwoTowerRuntime  # noqa: E402
from serving_process import start_openai_server, stop_server, with_chat_template  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KNOBS = dict(block_size=8, steps_per_block=8, confidence_threshold=0.05)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The demo checkpoint (same weights as demo_dir) with a chat template in its tokenizer config."""
    return with_chat_template(write_demo_checkpoint(tmp_path_factory.mktemp("oai") / "demo", seed=0))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    proc, port = start_openai_server(tmp_path_factory.mktemp("oai_log") / "server.log", "--checkpoint", str(checkpoint),
                                     "--served-model-name", "twotower-demo", "--default-temperature", "0")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def runtime(checkpoint):
    return TwoTowerRuntime.from_checkpoint(checkpoint, dtype="float32")


def alone(runtime, prompt, **kw):
    args = dict(max_new_tokens=16, temperature=0.0, seed=0, **KNOBS)
    args.update(kw)
    return runtime.generate([prompt], **args)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["twotower-demo"]
    with urllib.request.urlopen(server + "/health") as r:
        assert r.status == 200


def test_completion_equals_the_runtime(client, runtime):
    reply = client.completions.create(model="twotower-demo", prompt="The towers", max_tokens=24, temperature=0.7,
                                      seed=11, extra_body=KNOBS)
    ref = alone(runtime, "The towers", max_new_tokens=24, temperature=0.7, seed=11)
    assert reply.choices[0].text == ref.text[0]
    assert reply.usage.completion_tokens == 24 and reply.usage.prompt_tokens == len(runtime.tokenizer.encode("The towers"))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24


def test_streaming_sends_one_chunk_per_block(client, runtime):
    stream = client.completions.create(model="twotower-demo", prompt="stream", max_tokens=24, stream=True,
                                       stream_options={"include_usage": True}, extra_body=KNOBS)
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == alone(runtime, "stream", max_new_tokens=24).text[0]
    assert len(texts) == 3 + 1  # three blocks of 8, then the finish chunk
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24


@pytest.mark.parametrize("mode", ["speculative", "ar", "mock-ar"])
def test_modes_pass_through_extra_body(client, runtime, mode):
    reply = client.completions.create(model="twotower-demo", prompt="modes", max_tokens=12,
                                      extra_body={**KNOBS, "mode": mode})
    assert reply.choices[0].text == alone(runtime, "modes", max_new_tokens=12, mode=mode).text[0]


def test_token_id_prompts_and_n(client, runtime):
    reply = client.completions.create(model="twotower-demo", prompt=[[5, 6, 7], [40, 41]], max_tokens=8, n=2,
                                      temperature=0.9, seed=3, extra_body=KNOBS)
    assert len(reply.choices) == 4
    for i, prompt in enumerate([[5, 6, 7], [5, 6, 7], [40, 41], [40, 41]]):
        assert reply.choices[i].token_ids == alone(runtime, prompt, max_new_tokens=8, temperature=0.9,
                                                   seed=3 + i % 2).output_ids[0]


def test_chat_completion_uses_the_template(client, runtime):
    messages = [{"role": "user", "content": "hello"}]
    reply = client.chat.completions.create(model="twotower-demo", messages=messages, max_tokens=8, extra_body=KNOBS)
    ids = runtime.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert reply.choices[0].message.content == alone(runtime, list(ids), max_new_tokens=8).text[0]
    assert reply.choices[0].message.role == "assistant"


@pytest.mark.parametrize("mode", ["diffusion", "speculative", "ar", "mock-ar"])
def test_stop_strings_end_a_row_at_the_first_match(client, runtime, mode):
    """The stop string is taken from the row's own unstopped text at a random place; the reply
    ends before it (text) and at the token that completed it (ids), streamed or not."""
    full = alone(runtime, "Stop here", max_new_tokens=40, mode=mode)
    text, ids = full.text[0], full.output_ids[0]
    at = random.randrange(1, len(text) - 4)
    stop = text[at: at + 3]
    cut = text.find(stop)
    kw = dict(model="twotower-demo", prompt="Stop here", max_tokens=40, stop=[stop, "\x00never"],
              extra_body={**KNOBS, "mode": mode})
    reply = client.completions.create(**kw)
    choice = reply.choices[0]
    assert choice.text == text[:cut] and choice.finish_reason == "stop"
    kept = len(choice.token_ids)
    def text_of(ids):  # the text stop strings are matched in: special tokens (mock-AR may emit <mask>) add none
        return runtime.tokenizer.decode(ids, skip_special_tokens=True)

    assert choice.token_ids == ids[:kept] and stop in text_of(ids[:kept])
    assert stop not in text_of(ids[: kept - 1])  # the first token that completes it
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text[:cut]
    assert sum((c.choices[0].token_ids for c in chunks if c.choices), []) == ids[:kept]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop: expected a string or a list of 1 to 4"),
    (dict(prompt="x", extra_body={"echo": True}), "echo: not supported"),
    (dict(prompt="x", temperature=-1), "temperature"),
    (dict(prompt="x", extra_body={"block_size": 1000}), "block_size: must be <= 64"),
    (dict(prompt="x", extra_body={"mode": "beam"}), "mode: expected one of"),
    (dict(prompt="x", extra_body={"max_token": 5}), "unknown field(s) 'max_token'"),
    (dict(prompt="x", max_tokens=10**9), "max_tokens: prompt + output too long"),
    (dict(prompt=[[5, 999]]), "outside the vocabulary"),
    (dict(prompt="x", model="other"), "is not served here"),
])
def test_bad_requests_get_openai_errors(client, kwargs, message):
    kwargs.setdefault("model", "twotower-demo")
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(max_tokens=kwargs.pop("max_tokens", 4), **kwargs)
    assert message in str(err.value)
    assert client.completions.create(model="twotower-demo", prompt="ok", max_tokens=4).choices[0].text is not None


# ---- in-flight batching under load ------------------------------------------------------------------------

def stream_with_timing(url: str, body: dict, out: dict, key, first_block: threading.Event | None = None) -> None:
    """POST a streaming completion; record (seconds to the first block, all block times, text);
    ``first_block`` is set when the first block arrives."""
    request = urllib.request.Request(url + "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    times, text = [], []
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["token_ids"]:
                times.append(time.perf_counter() - start)
                text.append(chunk["choices"][0]["text"])
                if first_block is not None:
                    first_block.set()
    out[key] = (times[0], times, "".join(text))


def test_64_requests_sent_together_start_together(server, runtime):
    results: dict = {}
    bodies = {i: {"prompt": f"request number {i}" + "!" * (i % 7), "max_tokens": 16, "seed": i, "temperature": 0.8,
                  **KNOBS} for i in range(64)}
    threads = [threading.Thread(target=stream_with_timing, args=(server, b, results, i)) for i, b in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    first = [results[i][0] for i in range(64)]
    assert max(first) <= 2 * min(first), (min(first), max(first))  # was 35x with static batches of 8
    for i, b in bodies.items():
        assert results[i][2] == alone(runtime, b["prompt"], seed=i, temperature=0.8).text[0], i


def test_a_short_request_joins_a_busy_batch_within_a_few_blocks(server, runtime):
    results: dict = {}
    streaming = [threading.Event() for _ in range(8)]
    long_threads = [threading.Thread(target=stream_with_timing, args=(
        server, {"prompt": f"long {i}", "max_tokens": 400, "seed": i, **KNOBS}, results, ("long", i), streaming[i]))
        for i in range(8)]
    for t in long_threads:
        t.start()
    for event in streaming:  # every long request is in the batch and streaming (400 tokens: dozens of blocks)
        assert event.wait(timeout=300)
    assert not results  # ... and none has finished
    stream_with_timing(server, {"prompt": "short", "max_tokens": 8, **KNOBS}, results, "short")
    for t in long_threads:
        t.join(timeout=600)
    gaps = [b - a for i in range(8) for a, b in zip(results[("long", i)][1], results[("long", i)][1][1:])]
    block = sorted(gaps)[len(gaps) // 2]  # the median time of one block of the busy batch
    assert results["short"][0] <= 4 * block, (results["short"][0], block)  # not after the long ones finish
    assert results["short"][2] == alone(runtime, "short", max_new_tokens=8).text[0]
    assert all(results[("long", i)][2] == alone(runtime, f"long {i}", max_new_tokens=400, seed=i).text[0]
               for i in range(8))
