"""The playground in chromium against a live tiny server started without --enable-return-routed-experts: it loads
offline, streams chat and completions token by token with exactly the API's text and logprobs, stops and
regenerates, shows the API's errors, and says that routing is off. Screenshots of each view go to `screenshots`."""

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server.live import LiveServer, engine_held_after
from tests.server.playground.browser import PageWatch, expect, fill, non_streamed, token_texts, watched_page

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ANSWER = ".turn.assistant .answer"


def token_data(answer: Any, key: str) -> list[str]:
    return answer.locator(".tok").evaluate_all(f"spans => spans.map(s => s.dataset.{key})")


def span_texts(answer: Any) -> list[str]:
    return answer.locator(".tok").evaluate_all("spans => spans.map(s => s.textContent)")


def only_failed_loads(watch: PageWatch) -> bool:
    """Console errors are Chrome's notes of refused requests (the API's 4xx), never the page's own."""
    return all(e.startswith("Failed to load resource") for e in watch.errors)


def chat(page: Any, message: str) -> Any:
    page.fill("#chat-input", message)
    page.click("#chat-send")
    return page.locator(ANSWER).last


def test_page_loads_offline_without_console_errors(browser: Any, server: LiveServer, screenshots: Path) -> None:
    for path in ("/", "/playground"):
        with watched_page(browser) as (page, watch):
            page.goto(server.base_url + path)
            expect(page.locator("#server-state")).to_have_attribute("data-ready", "1")
            expect(page.locator("#model-name")).to_contain_text("customllm")
            expect(page.locator("#state-running")).to_have_text("0")
            expect(page.locator("#state-kv")).to_have_text("0.0 %")
            expect(page.locator("#answer-routing")).to_contain_text("Generate an answer")
            assert watch.errors == []
            requested = {p for _, p, _ in watch.requests}
            assert {path, "/playground/main.js", "/playground/playground.css", "/metrics", "/v1/models"} <= requested
            if path == "/":
                page.screenshot(path=screenshots / "start.png")


def test_chat_streams_the_api_answer_token_by_token(page: tuple[Any, PageWatch], server: LiveServer,
                                                    http: httpx.Client, screenshots: Path) -> None:
    page, watch = page
    fill(page, seed=7, temperature=1, max_tokens=12)
    with engine_held_after(server, 3) as release:
        answer = chat(page, "Tell me about experts")
        # Three model steps ran, the fourth waits: the page shows the three tokens while the answer streams.
        expect(answer.locator(".tok")).to_have_count(3)
        expect(answer).to_have_attribute("data-state", "streaming")
        release.set()
    expect(answer).to_have_attribute("data-state", "done")
    body = watch.bodies(CHAT)[-1]
    assert body["seed"] == 7 and body["max_tokens"] == 12 and body["stream"] is True
    reference = http.post(CHAT, json=non_streamed(body)).json()
    (choice,) = reference["choices"]
    content = choice["message"]["content"]
    assert answer.text_content() == content
    entries = choice["logprobs"]["content"]
    assert len(entries) == reference["usage"]["completion_tokens"] == 12
    assert span_texts(answer) == token_texts(entries, content)
    assert [float(v) for v in token_data(answer, "logprob")] == [e["logprob"] for e in entries]
    assert [int(v) for v in token_data(answer, "tokenId")] == choice["token_ids"]
    expect(page.locator(".answer-meta")).to_have_text("length · 12 tokens after "
                                                      f"{reference['usage']['prompt_tokens']} prompt tokens")
    assert only_failed_loads(watch)
    page.screenshot(path=screenshots / "chat.png")


def test_token_tooltip_shows_logprob_alternatives_and_that_routing_is_off(
        page: tuple[Any, PageWatch], http: httpx.Client, screenshots: Path) -> None:
    page, watch = page
    fill(page, seed=11, max_tokens=6)
    answer = chat(page, "Hi")
    expect(answer).to_have_attribute("data-state", "done")
    # This server refuses return_routed_experts with a 400 naming it: the page asked again without.
    first, last = watch.bodies(CHAT)
    assert first["return_routed_experts"] is True and "return_routed_experts" not in last
    expect(page.locator("#routing-status")).to_have_attribute("data-routing", "off")
    (choice,) = http.post(CHAT, json=non_streamed(last)).json()["choices"]
    entries = choice["logprobs"]["content"]
    tooltip = page.locator("#tooltip")

    answer.locator(".tok").nth(1).hover()
    expect(tooltip).to_be_visible()
    expect(tooltip.locator(".logprob")).to_have_text(f"{entries[1]['logprob']:.4f}")
    alternatives = tooltip.locator(".alternatives .alt-logprob")
    expect(alternatives).to_have_text([f"{t['logprob']:.4f}" for t in entries[1]["top_logprobs"]])
    expect(tooltip.locator(".routing-note")).to_contain_text("--enable-return-routed-experts")
    expect(page.locator("#answer-routing")).to_contain_text("Routing is off")
    page.screenshot(path=screenshots / "token-routing-off.png")

    # Keyboard: focusing a token opens its tooltip, Escape closes it.
    page.mouse.move(0, 0)
    answer.locator(".tok").nth(2).focus()
    expect(tooltip.locator(".logprob")).to_have_text(f"{entries[2]['logprob']:.4f}")
    page.keyboard.press("Escape")
    expect(tooltip).to_be_hidden()
    assert only_failed_loads(watch)


def test_completion_mode_streams_the_api_text(page: tuple[Any, PageWatch], http: httpx.Client,
                                              screenshots: Path) -> None:
    page, watch = page
    page.click("#tab-completion")
    expect(page.locator("#completion-view")).to_be_visible()
    fill(page, seed=5, temperature=0.9, top_p=0.95, max_tokens=10)
    page.fill("#prompt", "The experts of a mixture")
    page.click("#completion-generate")
    answer = page.locator("#completion-output .answer")
    expect(answer).to_have_attribute("data-state", "done")
    body = watch.bodies(COMPLETIONS)[-1]
    assert body["prompt"] == "The experts of a mixture" and body["top_p"] == 0.95
    reference = http.post(COMPLETIONS, json=non_streamed(body)).json()
    (choice,) = reference["choices"]
    assert answer.text_content() == choice["text"]
    lp = choice["logprobs"]
    offsets = [*lp["text_offset"][1:], len(choice["text"])]
    assert span_texts(answer) == [choice["text"][a:b] for a, b in zip(lp["text_offset"], offsets, strict=True)]
    assert [float(v) for v in token_data(answer, "logprob")] == lp["token_logprobs"]
    expect(page.locator(".prompt-text")).to_have_text("The experts of a mixture")
    assert only_failed_loads(watch)
    page.screenshot(path=screenshots / "completion.png")


def test_a_stop_string_ends_the_answer_where_the_api_does(page: tuple[Any, PageWatch],
                                                           http: httpx.Client) -> None:
    page, watch = page
    fill(page, seed=21, max_tokens=16)
    free = http.post(CHAT, json={"messages": [{"role": "user", "content": "Go"}], "seed": 21, "max_tokens": 16,
                                 "temperature": 0.7, "top_p": 1, "skip_special_tokens": False}).json()
    text = free["choices"][0]["message"]["content"]
    # Three characters from the middle of the free answer (no newline or backslash: the field reads those).
    start = next(i for i in range(len(text) // 2, len(text) - 3) if not set(text[i:i + 3]) & {"\n", "\\"})
    stop = text[start:start + 3]
    fill(page, stop=stop)
    answer = chat(page, "Go")
    expect(answer).to_have_attribute("data-state", "done")
    body = watch.bodies(CHAT)[-1]
    assert body["stop"] == [stop]
    (choice,) = http.post(CHAT, json=non_streamed(body)).json()["choices"]
    assert choice["stop_reason"] == stop and len(choice["message"]["content"]) < len(text)
    assert answer.text_content() == choice["message"]["content"]
    assert span_texts(answer) == token_texts(choice["logprobs"]["content"], choice["message"]["content"])
    expect(page.locator(".answer-meta")).to_contain_text(f"stop string {json.dumps(stop, ensure_ascii=False)}")


def test_stop_aborts_the_request_and_regenerate_replaces_the_answer(
        page: tuple[Any, PageWatch], server: LiveServer, http: httpx.Client) -> None:
    page, watch = page
    fill(page, seed=3, max_tokens=40)
    aborted = server.metric("customllm_request_success_total", {"finish_reason": "abort"})
    with engine_held_after(server, 2) as release:
        answer = chat(page, "Count to forty")
        expect(answer.locator(".tok")).to_have_count(2)
        # The state panel (from /metrics, polled every 2 s) shows the request in flight.
        expect(page.locator("#state-running")).to_have_text("1", timeout=10_000)
        page.click("#chat-stop")
        expect(answer).to_have_attribute("data-state", "stopped")
        expect(page.locator(".answer-meta")).to_contain_text("stopped · 2 tokens")
        release.set()
    # The server saw the client leave and aborted the request (waited for; no timing is asserted).
    deadline = time.monotonic() + 30
    while server.metric("customllm_request_success_total", {"finish_reason": "abort"}) == aborted:
        assert time.monotonic() < deadline, "the stopped request was never aborted"
        time.sleep(0.05)

    page.click("#chat-regenerate")
    expect(page.locator(ANSWER)).to_have_count(1)
    answer = page.locator(ANSWER)
    expect(answer).to_have_attribute("data-state", "done")
    body = watch.bodies(CHAT)[-1]
    assert [m["role"] for m in body["messages"]] == ["user"]  # the stopped answer is not sent back
    (choice,) = http.post(CHAT, json=non_streamed(body)).json()["choices"]
    assert answer.text_content() == choice["message"]["content"]
    expect(answer.locator(".tok")).to_have_count(40)
    expect(page.locator("#state-rate")).to_have_text(re.compile(r"^\d+\.\d$"))  # two polls have passed


def test_an_api_error_is_shown_as_the_api_message(page: tuple[Any, PageWatch], http: httpx.Client,
                                                  screenshots: Path) -> None:
    page, watch = page
    fill(page, temperature=5)
    chat(page, "Too hot")
    expect(page.locator("#error")).to_be_visible()
    body = watch.bodies(CHAT)[-1]
    reply = http.post(CHAT, json=non_streamed(body))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "temperature"
    expect(page.locator("#error-message")).to_have_text(reply.json()["error"]["message"])
    expect(page.locator("#error-status")).to_have_text("400 invalid_request_error")
    # The refused request leaves no empty answer; the user's message stays for Regenerate.
    expect(page.locator(ANSWER)).to_have_count(0)
    expect(page.locator(".turn.user")).to_have_text("Too hot")
    assert only_failed_loads(watch)
    page.screenshot(path=screenshots / "error.png")

    page.click("#error-close")
    expect(page.locator("#error")).to_be_hidden()
    fill(page, temperature=0)
    page.click("#chat-regenerate")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "done")
