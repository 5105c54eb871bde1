"""The playground: its event stream over HTTP, and the page driven in a real headless Chromium.

The OpenAI server runs as users start it (the trained demo model; a checkpoint without a tokenizer
for the token-id view). The browser tests need Debian's ``chromium`` and the ``playwright`` package
(``pip install '.[browser]'``; Playwright drives the system browser through ``executable_path``,
its own browser download is not used) and skip, saying which is missing, without them. With
``TWOTOWER_SCREENSHOT=path`` the finished diffusion run is saved there (docs/playground.png).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi/uvicorn not installed (pip install '.[serve]')")

from trtllm_twotower.config import config_from_dict  # noqa: E402
from trtllm_twotower.demo import DEMO_CONFIG, TRAINED_DEMO_DIR, demo_tensors, write_checkpoint  # noqa: E402
from trtllm_twotower.runtime import TwoTowerRuntime  # noqa: E402
from serving_process import start_openai_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "Return a new list of"
TIMEOUT_MS = 60_000


def start_server(checkpoint: Path | None, log_path: Path):
    """The server on ``checkpoint`` (None: the trained demo model) -> (process, its URL)."""
    args = ["--default-temperature", "0"] + ([] if checkpoint is None else ["--checkpoint", str(checkpoint)])
    proc, port = start_openai_server(log_path, *args)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The trained demo model (byte-level tokenizer)."""
    proc, url = start_server(None, tmp_path_factory.mktemp("playground") / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    """A random tiny checkpoint without tokenizer files: ids in, ids out."""
    directory = tmp_path_factory.mktemp("bare")
    checkpoint = write_checkpoint(directory / "ckpt", DEMO_CONFIG, demo_tensors(config_from_dict(DEMO_CONFIG), seed=0),
                                  with_tokenizer=False)
    proc, url = start_server(checkpoint, directory / "server.log")
    yield url
    stop_server(proc)


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def completion_ids(server: str, body: dict) -> list[int]:
    """The same request through /v1/completions (which the page must agree with)."""
    status, text = post(server + "/v1/completions", body)
    assert status == 200, text
    return json.loads(text)["choices"][0]["token_ids"]


# ---- the event stream over HTTP (no browser) ---------------------------------------------------------------
def test_the_event_stream_is_the_runtimes_on_step(server):
    body = {"prompt": PROMPT, "max_tokens": 40, "mode": "speculative", "block_size": 8, "steps_per_block": 2,
            "confidence_threshold": 0.5, "temperature": 0.6, "seed": 5}
    status, text = post(server + "/v1/playground/events", body)
    assert status == 200
    frames = text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""] and all(f.startswith("data: ") for f in frames[:-1])
    events = [json.loads(f[len("data: "):]) for f in frames[:-2]]
    assert events[0] == {"type": "start", "mode": "speculative", "block_size": 8, "steps_per_block": 2,
                         "max_new_tokens": 40, "rows": 1, "tokenizer": True}
    result = events[-1]
    assert result["type"] == "result" and result["time_to_first_block"] > 0 and result["tokens_per_second"] > 0
    runtime = TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, dtype="float32")
    expected = []
    alone = runtime.generate([PROMPT], max_new_tokens=40, mode="speculative", block_size=8, steps_per_block=2,
                             confidence_threshold=0.5, temperature=0.6, seed=5, on_step=expected.append)
    streamed = events[1:-1]
    assert [e["type"] for e in streamed] == [e.kind for e in expected]
    for got, want in zip(streamed, expected):
        assert (got["block"], got["step"], got["positions"], got["tokens"], got["accepted"], got["corrected"]) == \
            (want.block, want.step, want.positions, want.tokens, want.accepted, want.corrected)
        assert got["pieces"] == [runtime.tokenizer.decode([t]) for t in want.tokens]
    assert result["output_ids"] == alone.output_ids and result["text"] == alone.text
    assert result["forwards_per_token"] == pytest.approx(alone.stats["forwards_per_token"])


def test_events_carry_logprobs_when_asked(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "mode": "ar", "temperature": 0, "logprobs": 3}
    status, text = post(server + "/v1/playground/events", body)
    assert status == 200
    events = [json.loads(f[len("data: "):]) for f in text.split("\n\n")[:-2]]
    tokens = [e for e in events if e["type"] == "token"]
    runtime = TwoTowerRuntime.from_checkpoint(TRAINED_DEMO_DIR, dtype="float32")
    alone = runtime.generate([PROMPT], max_new_tokens=12, mode="ar", temperature=0.0, logprobs=3)
    got = [x for e in tokens for x in e["logprobs"]]
    assert [x["logprob"] for x in got] == pytest.approx([e.logprob for e in alone.logprobs[0]], abs=1e-5)
    assert [[i for i, _ in x["top"]] for x in got] == [[i for i, _ in e.top] for e in alone.logprobs[0]]


@pytest.mark.parametrize("body, message", [
    ({"prompt": PROMPT, "block_size": 1000}, "block_size: must be <= 64"),
    ({"prompt": PROMPT, "steps_per_block": None}, "steps_per_block: expected an integer, got None"),
    ({"prompt": PROMPT, "stream": True}, "unknown field(s) 'stream'"),
    ({"prompt": PROMPT, "echo": True}, "echo: not supported"),
    ({"prompt": PROMPT, "logprobs": 9}, "logprobs: expected an integer in [0, 5]"),
    ({"prompt": {"text": PROMPT}}, "prompts[0]: expected a string or a list of ints"),
    ({"prompt": [5, 9999]}, "outside the vocabulary"),
])
def test_bad_event_requests_get_the_completions_errors(server, body, message):
    status, text = post(server + "/v1/playground/events", body)
    assert status == 400
    error = json.loads(text)["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_the_page_and_its_files_are_served(server):
    with urllib.request.urlopen(server + "/") as r:
        page = r.read().decode()
    for asset in ("playground/playground.js", "playground/playground.css"):
        assert asset in page
        with urllib.request.urlopen(f"{server}/{asset}") as r:
            assert r.status == 200 and r.read()


# ---- the page in headless Chromium ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install '.[browser]')")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Page:
    """A fresh browser page on ``url`` that records every request it makes and every script error."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1500, "height": 900})
        self.page = self.context.new_page()
        self.requests: list = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.goto(url + "/")
        self.page.wait_for_load_state("networkidle")

    def set_knobs(self, **knobs) -> None:
        for name, value in knobs.items():
            if name == "mode":
                self.page.select_option("#mode", value)
            elif isinstance(value, bool):
                self.page.set_checked(f"#{name}", value)
            else:
                self.page.fill(f"#{name}", str(value))

    def generate(self, runs: int = 1) -> None:
        self.page.click("#generate")
        self.page.wait_for_function(f"document.querySelectorAll('section.run.done').length === {runs}",
                                    timeout=TIMEOUT_MS)

    def kept_tokens(self, run: int = 0) -> list[int]:
        cells = self.page.locator("section.run").nth(run).locator(".cell.kept")
        return [int(t) for t in cells.evaluate_all("cells => cells.map(c => c.dataset.token)")]

    def count(self, selector: str, run: int = 0) -> int:
        return self.page.locator("section.run").nth(run).locator(selector).count()

    def close(self) -> None:
        assert not self.errors, self.errors
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def open_(url: str) -> Page:
        pages.append(Page(browser, url))
        return pages[-1]

    yield open_
    for page in pages:
        page.close()


def test_the_page_makes_no_external_request(open_page, server):
    page = open_page(server)
    page.set_knobs(max_tokens=16, compare=True)
    page.generate(runs=2)
    urls = [r.url for r in page.requests]
    assert server + "/" in urls and server + "/v1/playground/events" in urls
    outside = [u for u in urls if not (u.startswith(server + "/") or u.startswith("data:"))]
    assert not outside, outside


@pytest.mark.parametrize("max_tokens, compare", [(64, True), (40, False)])
def test_a_generation_fills_every_block(open_page, server, max_tokens, compare):
    page = open_page(server)
    knobs = dict(mode="diffusion", confidence_threshold=0.8, steps_per_block=16, block_size=16, temperature=0,
                 seed=0, max_tokens=max_tokens)
    page.set_knobs(**knobs, compare=compare)
    page.generate(runs=2 if compare else 1)
    blocks = -(-max_tokens // 16)
    assert page.count(".block") == blocks and page.count(".cell") == 16 * blocks
    assert page.count(".cell.masked") == 0 and page.count(".cell.committed") == 16 * blocks
    ids = page.kept_tokens()
    assert len(ids) == page.count(".cell.kept") == max_tokens
    assert int(page.page.locator("section.run").first.get_attribute("data-tokens")) == max_tokens
    assert ids == completion_ids(server, {"prompt": PROMPT, **knobs})
    titles = page.page.locator("section.run").first.locator(".cell.committed").evaluate_all(
        "cells => cells.map(c => [c.title, getComputedStyle(c).backgroundColor])")
    assert all("confidence 0." in t or "confidence 1." in t for t, _ in titles)
    assert len({colour for _, colour in titles}) > 1  # coloured by the step that committed them
    figures = page.page.locator("section.run .figures").first.inner_text()
    assert all(name in figures for name in ("tokens per step", "forwards per token", "time to first block", "tokens/s"))
    if compare:
        ar = completion_ids(server, {"prompt": PROMPT, **knobs, "mode": "ar"})
        assert page.kept_tokens(run=1) == ar
        if os.environ.get("TWOTOWER_SCREENSHOT"):
            page.page.screenshot(path=os.environ["TWOTOWER_SCREENSHOT"], full_page=True)


def test_speculative_drafts_are_shown_accepted_or_corrected(open_page, server):
    page = open_page(server)
    knobs = dict(mode="speculative", confidence_threshold=0.5, steps_per_block=2, block_size=16, temperature=0,
                 seed=0, max_tokens=64)
    page.set_knobs(**knobs, compare=True)
    page.generate(runs=2)
    ids = page.kept_tokens()
    assert ids == page.kept_tokens(run=1) == completion_ids(server, {"prompt": PROMPT, **knobs, "mode": "ar"})
    assert page.count(".cell.kept") == len(ids) > 16  # several blocks (AR greedy ends at EOS here)
    assert page.count(".cell.accepted") > 0 and page.count(".cell.rejected") > 0
    assert page.count(".cell.masked:not(.discarded)") == 0
    # every rejected draft names the AR token that replaced it, which opens the next block
    rows = page.page.locator("section.run").first.locator(".block").evaluate_all("""blocks => blocks.map(b =>
        [...b.querySelectorAll('.cell')].map(c => [c.className, c.dataset.token, c.dataset.correctedPiece || null]))""")
    for row, following in zip(rows, rows[1:]):
        rejected = [c for c in row if "rejected" in c[0]]
        if rejected:
            assert rejected[0][2] is not None and rejected[0][1] != following[0][1]
        assert "given" in following[0][0] and "kept" in following[0][0]


def test_the_knobs_change_what_is_sent(open_page, server):
    page = open_page(server)
    page.set_knobs(mode="speculative", confidence_threshold=0.65, steps_per_block=3, block_size=8, temperature=0.7,
                   seed=42, max_tokens=12, compare=True)
    page.page.fill("#prompt", "The file")
    with page.page.expect_request("**/v1/playground/events") as first:
        page.generate(runs=2)
    sent = [r.post_data_json for r in page.requests if r.url.endswith("/v1/playground/events")]
    knobs = {"confidence_threshold": 0.65, "steps_per_block": 3, "block_size": 8, "temperature": 0.7, "seed": 42,
             "max_tokens": 12, "prompt": "The file"}
    assert first.value.post_data_json in sent
    assert sorted(sent, key=lambda b: b["mode"]) == [{**knobs, "mode": "ar"}, {**knobs, "mode": "speculative"}]
    page.set_knobs(mode="diffusion", compare=False, prompt_ids=True)
    page.page.fill("#prompt", "82, 101, 116")
    with page.page.expect_request("**/v1/playground/events") as again:
        page.generate()
    assert again.value.post_data_json == {**knobs, "mode": "diffusion", "prompt": [82, 101, 116]}


@pytest.mark.parametrize("knobs, message", [
    ({"block_size": 999}, "block_size: must be <= 64 on this server, got 999"),
    ({"steps_per_block": ""}, "steps_per_block: expected an integer, got None"),
    ({"confidence_threshold": 1.5}, "confidence_threshold: expected a number in [0.0, 1.0], got 1.5"),
    ({"prompt_ids": True, "prompt": "5, , 7"}, "prompts[0]: expected a string or a list of ints, got list"),
    ({"prompt": ""}, "prompts[0]: empty prompt"),
])
def test_a_server_error_is_shown(open_page, server, knobs, message):
    page = open_page(server)
    page.set_knobs(**knobs)
    page.page.click("#generate")
    error = page.page.locator("#error")
    error.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert error.inner_text() == message
    assert page.page.locator("#generate").is_enabled()


@pytest.mark.parametrize("status, body, message", [
    (500, "Internal Server Error", "the server answered 500 Internal Server Error"),
    (200, 'data: {"type": "start", "mode": "diffusion", "block_size": 4, "steps_per_block": 4, "max_new_tokens": 8, '
          '"rows": 1, "tokenizer": true}\n\n'
          'data: {"type": "error", "error": {"message": "generation failed: out of memory", "type": "server_error"}}\n\n',
     "generation failed: out of memory"),
    (200, 'data: {"type": "start", "mode": "diffusion", "block_size": 4, "steps_per_block": 4, "max_new_tokens": 8, '
          '"rows": 1, "tokenizer": true}\n\n', "the server closed the stream before its end"),
])
def test_a_failure_after_validation_is_shown(open_page, server, status, body, message):
    """What the real server cannot be made to do on demand (fail mid-stream, answer a bare 500),
    answered in its place by the browser's request routing."""
    page = open_page(server)
    page.page.route("**/v1/playground/events", lambda route: route.fulfill(
        status=status, body=body, content_type="text/event-stream" if status == 200 else "text/plain"))
    page.page.click("#generate")
    error = page.page.locator("#error")
    error.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert error.inner_text() == message


def test_stop_cancels_a_running_generation(open_page, server):
    page = open_page(server)
    page.set_knobs(mode="ar", max_tokens=4000)
    page.page.fill("#prompt", "A")
    page.page.click("#generate")
    page.page.locator("section.run .cell.kept").first.wait_for(timeout=TIMEOUT_MS)
    page.page.click("#stop")
    error = page.page.locator("#error")
    error.wait_for(state="visible", timeout=TIMEOUT_MS)
    assert error.inner_text() == "stopped" and page.page.locator("#generate").is_enabled()
    assert page.page.locator("section.run.done").count() == 0


def test_token_ids_without_a_tokenizer(open_page, bare_server):
    page = open_page(bare_server)
    knobs = dict(mode="diffusion", confidence_threshold=0.05, steps_per_block=4, block_size=8, temperature=0, seed=0,
                 max_tokens=16)
    page.set_knobs(**knobs, prompt_ids=True)
    page.page.fill("#prompt", "5, 6, 7, 8")
    page.generate()
    ids = page.kept_tokens()
    assert ids == completion_ids(bare_server, {"prompt": [5, 6, 7, 8], **knobs})
    texts = page.page.locator("section.run .cell.kept").all_inner_texts()
    assert texts == [str(t) for t in ids]  # no tokenizer: the cells show ids
    assert page.page.locator("section.run .text .output").inner_text().split() == [str(t) for t in ids]
    assert page.page.locator("section.run .text .prompt-echo").inner_text() == "5, 6, 7, 8 → "
