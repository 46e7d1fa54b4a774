"""The chat page in a real browser against the launched service: streaming, stop, sessions, edit and
regenerate, alternatives, markdown without executing model output, context trimming, New chat during
a stream, network failure, the 400 px layout."""

from __future__ import annotations

import re
import time

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.gateway.browser.conftest import MAX_MODEL_LEN, ChatPage, metric

pytestmark = pytest.mark.slow

# A long generation that only a stop ends (the bundled model would often stop early by itself).
ENDLESS = {"max_tokens": MAX_MODEL_LEN // 2, "advanced": {"ignore_eos": True}}
ABORTS = ("novainfer_requests_finished_total", {"finish_reason": "abort"})


def test_send_streams_answer_with_stats(page: ChatPage) -> None:
    assert page.find("link[rel=icon]").get_attribute("href").endswith("/static/favicon.svg")
    page.set_settings(max_tokens=24)
    page.type_and_send("Hello! Who are you?")
    # The Stop button while streaming is checked on an endless answer (test_stop_aborts_the_engine_request):
    # a 24-token one may be over before a poll sees it.
    answer = page.wait_streamed_text()
    assert answer
    page.wait_idle()
    first = page.messages("assistant")[-1]
    assert first.find_element(By.CSS_SELECTOR, ".body").text.strip()
    stats = first.find_element(By.CSS_SELECTOR, ".stats").text
    assert re.search(r"\d+ tokens", stats) and "TTFT" in stats and "cached" in stats, stats
    assert page.sessions() == ["Hello! Who are you?"]
    assert re.fullmatch(rf"\d+ / {MAX_MODEL_LEN} tokens", page.find("#tokens").text)
    assert page.find("#prompt").get_attribute("value") == ""

    # The second turn's prompt starts with the first's: the prefix cache serves it, and the page says so.
    second = page.send("Tell me more.")
    stats = second.find_element(By.CSS_SELECTOR, ".stats").text
    cached = int(re.search(r"\((\d+) cached\)", stats).group(1))
    assert cached > 0, stats
    assert "tok/s" in stats


def test_stop_aborts_the_engine_request(page: ChatPage) -> None:
    aborts_before = metric(page.server, ABORTS[0], **ABORTS[1])
    page.set_settings(**ENDLESS)
    page.type_and_send("Write a very long story.")
    partial = page.wait_streamed_text(min_chars=10)
    assert page.streaming(), "the Stop button shows while streaming"
    page.find("#prompt").send_keys(Keys.ESCAPE)  # Esc stops, like the Stop button
    page.wait_idle(timeout=30)
    answer = page.messages("assistant")[-1]
    assert "Stopped." in answer.text
    assert answer.find_element(By.CSS_SELECTOR, ".body").text.startswith(partial.rstrip("▍…").strip()[:10])
    page.wait(lambda: metric(page.server, ABORTS[0], **ABORTS[1]) > aborts_before, "the engine counts an abort", 60)


def test_sessions_are_kept_apart_across_reloads(page: ChatPage) -> None:
    page.set_settings(max_tokens=8)
    page.send("alpha question")
    page.find("#new-chat").click()
    assert page.messages() == []
    assert page.find("#set-max_tokens").get_attribute("value") == "8", "a new chat starts with the current settings"
    page.set_settings(system="You are Bravo.")  # this session's own
    page.send("bravo question")
    page.reload()
    assert sorted(page.sessions()) == ["alpha question", "bravo question"]
    for title, system in (("alpha question", ""), ("bravo question", "You are Bravo.")):
        page.find_all("#sessions .session .title")[page.sessions().index(title)].click()
        page.wait(lambda t=title: page.bodies("user") == [t], f"session {title!r} shows only its own message")
        assert len(page.messages("assistant")) == 1
        assert page.find("#set-system").get_attribute("value") == system

    # Rename (inline), delete one, then delete all. A session's buttons show on the selected one.
    page.find_all("#sessions .session .title")[page.sessions().index("alpha question")].click()
    page.find("#sessions .session.active .rename").click()
    # The title starts selected, so typing replaces it (WebDriver's clear() would blur, which saves).
    page.find("#sessions .rename-input").send_keys("Renamed", Keys.ENTER)
    page.reload()
    assert sorted(page.sessions()) == ["Renamed", "bravo question"]
    page.find_all("#sessions .session .title")[page.sessions().index("bravo question")].click()
    page.find("#sessions .session.active .delete").click()
    assert page.sessions() == ["Renamed"]
    page.find("#delete-all").click()
    page.d.switch_to.alert.accept()
    assert page.sessions() == ["New chat"] and page.messages() == []
    page.reload()
    assert page.sessions() == ["New chat"]


def test_edit_earlier_message_and_regenerate(page: ChatPage) -> None:
    page.set_settings(max_tokens=8, system="Answer briefly.")
    page.send("first question")
    page.send("second question")
    page.capture_requests()
    first = page.messages("user")[0]
    first.find_element(By.CSS_SELECTOR, "button[title^='Edit']").click()
    area = page.find("#chat .msg.editing textarea")
    area.clear()
    area.send_keys("edited question", Keys.ENTER)
    page.wait_idle()
    assert page.bodies("user") == ["edited question"], "later turns are replaced"
    assert len(page.messages("assistant")) == 1
    (body,) = page.requests()
    assert body["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "edited question"},
    ]
    assert body["max_tokens"] == 8 and body["stream"] is True
    # Empty settings are the server's defaults: left out, never sent as 0.
    assert not {"temperature", "top_p", "top_k", "seed", "stop"} & body.keys()


def test_regenerate_keeps_alternatives(page: ChatPage) -> None:
    page.set_settings(max_tokens=12, temperature=1.0, seed=1)
    first = page.send("Say something.").find_element(By.CSS_SELECTOR, ".body").text
    page.set_settings(seed=2)
    page.capture_requests()
    page.find("#chat .msg.assistant .regenerate").click()
    page.wait_idle()
    (body,) = page.requests()
    assert body["messages"] == [{"role": "user", "content": "Say something."}], "regenerate resends the same turn"
    assert len(page.messages("assistant")) == 1
    assert page.find(".alt-index").text == "2/2"
    second = page.bodies("assistant")[0]
    page.find("button[title='Previous answer']").click()
    assert page.find(".alt-index").text == "1/2" and page.bodies("assistant")[0] == first
    page.find("button[title='Next answer']").click()
    assert page.find(".alt-index").text == "2/2" and page.bodies("assistant")[0] == second
    page.reload()
    assert page.find(".alt-index").text == "2/2", "alternatives persist"


XSS = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> [link](javascript:window.__xss=3)'
MARKDOWN = "## Heading\n\nSome **bold** text.\n\n```python\ndef f(x):\n    return x + 1\n```\n\n" + XSS


def test_markdown_renders_and_model_output_never_executes(page: ChatPage) -> None:
    # A stored conversation goes through the same renderer as a streamed answer; the model cannot be
    # made to say exactly this, so the answer is put in storage.
    session = {
        "id": "s1",
        "title": "xss",
        "titled": True,
        "updated": 1,
        "settings": {},
        "contextStart": 0,
        "tokens": None,
        "messages": [
            {
                "id": "u1",
                "role": "user",
                "content": '<img src=x onerror="window.__xss=4"> <script>window.__xss=5</script>',
            },
            {"id": "a1", "role": "assistant", "alts": [{"content": MARKDOWN}], "alt": 0},
        ],
    }
    page.js(
        "localStorage.setItem('novainfer.chat.v1', JSON.stringify({sessions: [arguments[0]], currentId: 's1'}))",
        session,
    )
    page.reload()
    answer = page.find("#chat .msg.assistant .body")
    assert answer.find_element(By.CSS_SELECTOR, "h2").text == "Heading"
    assert answer.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    code = answer.find_element(By.CSS_SELECTOR, "pre code.hljs")
    assert code.find_elements(By.CSS_SELECTOR, "span"), "highlight.js coloured the code"
    assert "def f(x):" in code.text
    answer.find_element(By.CSS_SELECTOR, ".copy-code").click()
    assert not page.find_all("#chat script") and not page.find_all("#chat [onerror]")
    assert not page.find_all("#chat a[href^='javascript']")
    assert page.bodies("user")[0].startswith("<img src=x"), "a user message is shown as text"
    # A live turn whose message carries the same payloads (the model may echo them).
    page.set_settings(max_tokens=24)
    page.send("Repeat exactly: " + XSS)
    time.sleep(0.5)
    assert page.js("return window.__xss") is None, "model output or a message executed"


def test_overflowing_conversation_trims_with_notice_and_keeps_answering(page: ChatPage) -> None:
    page.set_settings(max_tokens=8, system="You are terse.")
    filler = " ".join(["lorem ipsum dolor sit amet"] * 30)  # ~150 tokens a message: the 4th overflows
    for i in range(2):
        page.send(f"Message {i}: {filler}")
    page.capture_requests()
    for i in range(2, 4):
        page.send(f"Message {i}: {filler}")
    assert page.find_all("#chat .trim-notice"), "a notice marks where the sent conversation begins"
    assert "no longer sent" in page.find("#notice").text
    assert page.find_all("#chat .msg.dropped"), "dropped messages are shown dimmed"
    assert not page.find_all("#chat .msg.failed") and not page.find_all("#chat .note.error")
    for body in page.requests():
        assert body["messages"][0] == {"role": "system", "content": "You are terse."}, "never dropped"
    assert not any(m["content"].startswith("Message 0:") for m in page.requests()[-1]["messages"])
    # What is shown undimmed is what was sent (without the system prompt), plus the answer.
    shown = page.find_all("#chat .msg:not(.dropped)")
    assert len(shown) == len(page.requests()[-1]["messages"]) - 1 + 1
    used = int(page.find("#tokens").text.split(" / ")[0])
    assert 0 < used <= MAX_MODEL_LEN


def test_new_chat_during_a_stream_stops_it_without_leaking(page: ChatPage) -> None:
    aborts_before = metric(page.server, ABORTS[0], **ABORTS[1])
    page.set_settings(**ENDLESS)
    page.type_and_send("Write a very long story.")
    page.wait_streamed_text(min_chars=5)
    page.find("#new-chat").click()
    page.wait_idle(timeout=30)
    time.sleep(1.5)  # any late delta would land now
    assert page.messages() == [], "the old answer leaked into the new chat"
    page.wait(lambda: metric(page.server, ABORTS[0], **ABORTS[1]) > aborts_before, "the engine counts an abort", 60)
    assert len(page.sessions()) == 2
    page.find_all("#sessions .session .title")[page.sessions().index("Write a very long story.")].click()
    answer = page.wait(lambda: page.messages("assistant"), "the old session shows its answer")[0]
    assert answer.find_element(By.CSS_SELECTOR, ".body").text.strip() and "Stopped." in answer.text


def test_unreachable_server_keeps_the_message(page: ChatPage) -> None:
    page.d.execute_cdp_cmd("Network.enable", {})
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    page.d.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
    try:
        page.type_and_send("are you there?")
        page.wait(lambda: page.find_all("#chat .msg.user.failed"), "the message is marked failed")
        assert "unreachable" in page.find("#chat .msg.user.failed").text
        assert "bad" in page.find("#health").get_attribute("class")
        assert page.find("#prompt").get_attribute("value") == "are you there?", "the unsent text stays in the input"
        assert not page.messages("assistant")
    finally:
        page.d.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
        page.d.execute_cdp_cmd("Network.disable", {})
    # Sending again replaces the failed message rather than repeating it.
    page.set_settings(max_tokens=8)
    page.find("#prompt").send_keys(Keys.ENTER)
    page.wait_idle()
    assert page.bodies("user") == ["are you there?"] and not page.find_all("#chat .msg.failed")
    assert len(page.messages("assistant")) == 1


def test_narrow_layout_has_no_horizontal_overflow(page: ChatPage) -> None:
    page.open(width=400, height=800)
    page.set_settings(max_tokens=16)
    page.send("A long word: " + "x" * 200 + "\n```\n" + "y = 1  # " + "z" * 200 + "\n```")
    overflow = "const e = document.scrollingElement; return e.scrollWidth - e.clientWidth"
    assert page.js(overflow) <= 0
    assert page.js("const c = document.getElementById('chat'); return c.scrollWidth - c.clientWidth") <= 0
    assert not page.find("#sidebar .session").is_displayed() or page.find("#sidebar").location["x"] < 0
    page.find("#toggle-settings").click()
    settings = page.find("#settings")
    page.wait(settings.is_displayed, "the settings overlay opens")
    assert page.js("return getComputedStyle(document.getElementById('settings')).position") == "fixed"
    assert settings.rect["x"] >= 0 and settings.rect["x"] + settings.rect["width"] <= 400 + 1
    assert page.js(overflow) <= 0
    page.find("#prompt").send_keys(Keys.ESCAPE)
    page.find("#toggle-sidebar").click()
    page.wait(lambda: page.find("#sidebar").rect["x"] >= 0, "the sidebar slides in")
    assert page.js(overflow) <= 0


def test_settings_errors_are_reported_not_sent(page: ChatPage) -> None:
    page.capture_requests()
    page.set_settings(max_tokens=8)
    page.js("const a = document.getElementById('set-advanced'); a.value = '{oops'; a.dispatchEvent(new Event('input'))")
    page.type_and_send("hello")
    page.wait(lambda: "Advanced JSON" in page.find("#notice").text, "the settings error is shown")
    assert page.requests() == [] and page.messages() == [], "nothing is shown that was not sent"
    assert page.find("#prompt").get_attribute("value") == "hello"
    assert page.find("#settings").is_displayed()
