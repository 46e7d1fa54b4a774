"""The engine core dies mid-answer: the page keeps the partial answer and appends the error.

Its own service, since killing the engine ends (or, with a supervising launcher, restarts) it; the
test asserts only what the page must show, not what the launcher does next.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By

from tests.e2e.conftest import Server
from tests.gateway.browser.conftest import MAX_MODEL_LEN, ChatPage, launch_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch_service(str(tmp_path_factory.mktemp("serve")), "--engine-timeout-s", "3")
    yield server
    server.stop()


def test_engine_killed_mid_stream_keeps_partial_answer(page: ChatPage) -> None:
    page.set_settings(max_tokens=MAX_MODEL_LEN // 2, advanced={"ignore_eos": True})
    page.type_and_send("Write a very long story.")
    page.wait_streamed_text(min_chars=20)
    (engine_pid,) = page.server.pids("services.engine_core")
    os.kill(engine_pid, signal.SIGKILL)
    page.wait_idle()
    answer = page.messages("assistant")[-1]
    body = answer.find_element(By.CSS_SELECTOR, ".body").text.strip()
    assert len(body) >= 20, "the partial answer is kept"
    errors = answer.find_elements(By.CSS_SELECTOR, ".note.error")
    assert errors and errors[0].text.strip(), "the error is appended to the answer"
    assert not page.find_all("#chat .msg.user.failed"), "the question was answered in part, not failed"
