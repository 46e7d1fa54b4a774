"""Screenshots of the chat page for the README (docs/img/chat-*.png), taken from a real conversation
with the bundled model through the same browser helpers the tests use.

    .venv/bin/python -m tests.gateway.browser.screenshots [docs/img]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.gateway.browser.conftest import ChatPage, launch_service, new_driver


def main(out_dir: str = "docs/img") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = launch_service(tmp)
        driver = new_driver()
        try:
            page = ChatPage(driver, server, timeout=900)
            page.open()
            page.set_settings(max_tokens=48, temperature=0)
            page.send("What is the capital of France?")
            page.find("#new-chat").click()
            page.set_settings(max_tokens=160, temperature=0, system="You are a concise coding assistant.")
            page.send("Write a Python function that checks whether a string is a palindrome.")
            page.send("Now make it ignore case.")
            for theme in ("light", "dark"):
                page.js("localStorage.setItem('novainfer.theme', arguments[0])", theme)
                page.open(clear=False)
                if theme == "dark":
                    page.find("#toggle-settings").click()
                driver.save_screenshot(str(out / f"chat-desktop-{theme}.png"))
                page.open(width=400, height=820, clear=False)
                driver.save_screenshot(str(out / f"chat-narrow-{theme}.png"))
                page.find("#toggle-settings").click()
                driver.save_screenshot(str(out / f"chat-narrow-settings-{theme}.png"))
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
