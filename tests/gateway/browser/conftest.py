"""Browser tests of the chat page: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium against the launched service (tests/e2e's start_server) with the bundled model.

One service and one browser per module; each test gets a fresh page (empty localStorage) and ends by
checking that the page logged no JavaScript error. Waits are explicit and generous: a 2-core CI
machine running the model is slow, and no test depends on what the model says.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.conftest import Server, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# The context is kept small so that a few long messages overflow it.
MAX_MODEL_LEN = 512
WAIT_S = 240.0
DESKTOP = (1280, 860)


def launch_service(tmp_dir: str, *extra: str) -> Server:
    return start_server(tmp_dir, "--max-model-len", str(MAX_MODEL_LEN), *extra)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch_service(str(tmp_path_factory.mktemp("serve")))
    yield server
    server.stop()


def new_driver() -> Any:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = new_driver()
    yield d
    d.quit()


class ChatPage:
    """The chat page in the browser, with the actions and waits the tests need."""

    def __init__(self, driver: Any, server: Server, timeout: float = WAIT_S) -> None:
        self.d = driver
        self.server = server
        self.timeout = timeout

    # Navigation and state
    def open(self, width: int = DESKTOP[0], height: int = DESKTOP[1], clear: bool = True) -> None:
        """Loads the page at this window size; clear: with nothing stored (no sessions, default theme)."""
        self.d.set_window_size(width, height)
        self.d.get(self.server.base_url + "/")
        if clear:
            self.d.execute_script("localStorage.clear()")
            self.d.get(self.server.base_url + "/")
        self.wait_ready()

    def reload(self) -> None:
        self.d.refresh()
        self.wait_ready()

    def wait_ready(self) -> None:
        self.wait(lambda: self.find("#model").text != "", "the page shows the served model")
        self.wait(lambda: "ok" in self.find("#health").get_attribute("class"), "the health dot turns green")

    def wait(self, condition: Callable[[], Any], what: str, timeout: float | None = None) -> Any:
        def check(_: Any) -> Any:
            try:
                return condition()
            except StaleElementReferenceException:  # re-rendered while we looked
                return False

        timeout = timeout or self.timeout
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(check)
        except TimeoutException:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}") from None

    def find(self, css: str) -> WebElement:
        return self.d.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    # Settings (fields of the current session)
    def set_settings(self, **values: Any) -> None:
        for key, value in values.items():
            text = json.dumps(value) if key == "advanced" else str(value)
            self.js(
                "const el = document.getElementById(arguments[0]);"
                "el.value = arguments[1]; el.dispatchEvent(new Event('input'));",
                "set-" + key,
                text,
            )

    # Chatting
    def type_and_send(self, text: str) -> None:
        prompt = self.find("#prompt")
        prompt.clear()
        # send_keys types "\n" as Enter, which sends: newlines go in with Shift+Enter.
        lines = text.split("\n")
        for i, line in enumerate(lines):
            prompt.send_keys(line)
            if i < len(lines) - 1:
                prompt.send_keys(Keys.SHIFT, Keys.ENTER)
        prompt.send_keys(Keys.ENTER)

    def streaming(self) -> bool:
        return self.find("#stop").is_displayed()

    def wait_idle(self, timeout: float | None = None) -> None:
        self.wait(lambda: not self.streaming() and self.find("#send").is_displayed(), "the answer ended", timeout)

    def send(self, text: str) -> WebElement:
        """Send text and wait for the whole answer; returns the last assistant message."""
        self.type_and_send(text)
        self.wait_idle()
        return self.messages("assistant")[-1]

    def messages(self, role: str = "") -> list[WebElement]:
        return self.find_all(f"#chat .msg{'.' + role if role else ''}")

    def bodies(self, role: str = "") -> list[str]:
        return [m.find_element(By.CSS_SELECTOR, ".body").text for m in self.messages(role)]

    def wait_streamed_text(self, min_chars: int = 1) -> str:
        """Waits until the streaming answer shows some text; returns it."""

        def text() -> str | bool:
            msgs = self.find_all("#chat .msg.assistant.streaming .body")
            if msgs:
                body = msgs[0].text
            else:
                # A short answer may stream to its end between two polls (a fast engine: 24 tokens
                # in ~0.3 s), and then no message is streaming any more: the answer to the message
                # just sent is the last one, an assistant's.
                last = self.messages()
                if self.streaming() or not last or "assistant" not in (last[-1].get_attribute("class") or "").split():
                    return False
                body = last[-1].find_element(By.CSS_SELECTOR, ".body").text
            return len(body.strip("…▍ ")) >= min_chars and body

        return self.wait(text, "the answer started streaming")

    def sessions(self) -> list[str]:
        return [e.text for e in self.find_all("#sessions .session .title")]

    # Request bodies, captured by wrapping window.fetch in the page.
    def capture_requests(self) -> None:
        self.js(
            "window.__bodies = []; const f = window.fetch;"
            "window.fetch = (url, init) => {"
            "  if (String(url).includes('/v1/chat/completions')) window.__bodies.push(JSON.parse(init.body));"
            "  return f(url, init); };"
        )

    def requests(self) -> list[dict[str, Any]]:
        return self.js("return window.__bodies")

    # The browser console
    def js_errors(self) -> list[str]:
        """SEVERE console entries other than failed resource loads (a 404 image, a 503 health probe)."""
        return [e["message"] for e in self.d.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]


@pytest.fixture
def page(driver: Any, service: Server) -> Iterator[ChatPage]:
    p = ChatPage(driver, service)
    driver.get_log("browser")  # drop what an earlier test left
    p.open()
    yield p
    errors = p.js_errors()
    assert not errors, f"JavaScript errors in the browser console: {errors}"


def metric(server: Server, name: str, **labels: str) -> float:
    """A series' value from the gateway's /metrics (0 when it does not exist yet)."""
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total
