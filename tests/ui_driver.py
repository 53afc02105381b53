"""Drives the web chat page (ui/app.py) in headless Chromium through Playwright: log in, set
the controls, send text and images (upload, paste, drop), read the history and the status line.

Every wait is on a DOM condition with a generous deadline that only a broken page reaches; the
failure message says what was awaited."""

from __future__ import annotations

import base64
import re
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT_MS = 60_000  # a page load, a login or one tiny-model answer on a busy 2-core machine
FINAL = ("completion tokens", "Error:", "Stopped.")


def alnum(text: str) -> str:
    """The ASCII letters and digits of a text: what survives Markdown rendering unchanged (a
    random model's answer holds bytes and punctuation that Markdown rewrites or hides)."""
    return "".join(c for c in text if c.isascii() and c.isalnum())


class ChatPage:
    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url

    def open(self, user: str | None = None, key: str | None = None) -> ChatPage:
        self.page.goto(self.url)
        if key is not None:
            self.page.wait_for_selector("input[type=password]", timeout=WAIT_MS)
            self.page.fill("input[type=text]", user or "tester")
            self.page.fill("input[type=password]", key)
            self.page.keyboard.press("Enter")
        self.page.wait_for_selector("#input textarea", timeout=WAIT_MS)
        self.wait_status("model(s) served", "the model list loaded from /v1/models")
        return self

    # -- controls ------------------------------------------------------------------------------
    def set_number(self, elem_id: str, value: float) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
        box.blur()

    def greedy(self, max_tokens: int) -> None:
        self.set_number("temperature", 0)
        self.set_number("max_tokens", max_tokens)

    def pick_model(self, name: str) -> None:
        self.page.click("#model input")
        self.page.locator(f"[role=option]:text-is('{name}')").click()
        self.page.wait_for_function(f"document.querySelector('#model input').value === {name!r}", timeout=WAIT_MS)

    def model_choices(self) -> list[str]:
        self.page.click("#model input")
        names = [t.strip().splitlines()[-1] for t in self.page.locator("[role=option]").all_inner_texts()]  # less the ✓
        self.page.keyboard.press("Escape")
        return names

    # -- sending -------------------------------------------------------------------------------
    def attach(self, *files: Path) -> None:
        before = self.attached()
        self.page.set_input_files("#input input[type=file]", [str(f) for f in files])
        self.wait_attached(before + len(files))

    def attached(self) -> int:
        return self.page.locator("#input .thumbnail-item").count()

    def wait_attached(self, n: int) -> None:
        self.page.wait_for_function(f"document.querySelectorAll('#input .thumbnail-item img').length === {n}",
                                    timeout=WAIT_MS)

    def paste_image(self, png: bytes, name: str = "pasted.png") -> None:
        self._file_event("#input textarea", "paste", png, name)

    def drop_image(self, png: bytes, name: str = "dropped.png") -> None:
        self._file_event("#input .full-container", "drop", png, name)

    def _file_event(self, selector: str, kind: str, data: bytes, name: str) -> None:
        before = self.attached()
        self.page.evaluate("""([selector, kind, b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            const target = document.querySelector(selector);
            const ev = kind === "paste"
                ? new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true})
                : new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
            target.dispatchEvent(ev);
        }""", [selector, kind, base64.b64encode(data).decode(), name])
        self.wait_attached(before + 1)

    def send(self, text: str) -> None:
        n = self.bot_count()
        self.page.fill("#input textarea", text)
        self.page.press("#input textarea", "Enter")
        self.wait_answer(n + 1)

    def send_nowait(self, text: str) -> None:
        self.page.fill("#input textarea", text)
        self.page.press("#input textarea", "Enter")

    def click(self, elem_id: str) -> None:
        self.page.click(f"#{elem_id}")

    # -- reading -------------------------------------------------------------------------------
    def bot_count(self) -> int:
        return self.page.locator("#chat [data-testid=bot]").count()

    def bot_texts(self) -> list[str]:
        return self.page.locator("#chat [data-testid=bot]").all_inner_texts()

    def user_texts(self) -> list[str]:
        return self.page.locator("#chat [data-testid=user]").all_inner_texts()

    def status(self) -> str:
        return self.page.inner_text("#status")

    def wait_status(self, words: str, what: str) -> None:
        try:
            self.page.wait_for_function(f"document.querySelector('#status').innerText.includes({words!r})",
                                        timeout=WAIT_MS)
        except Exception as e:
            raise AssertionError(f"not seen within {WAIT_MS / 1000:.0f}s: {what} (status line: "
                                 f"{self.status()!r})") from e

    def wait_last_answer_alnum(self, expected: str, what: str) -> None:
        """Waits until the last answer has ended with exactly `expected`'s ASCII letters and
        digits (`alnum`): a retried answer replaces the earlier one in place, so neither the
        answer count nor the status line's words tell that the new one is done."""
        try:
            self.page.wait_for_function(
                "([want, finals]) => { const b = document.querySelectorAll('#chat [data-testid=bot]');"
                " const s = document.querySelector('#status').innerText;"
                " return b.length > 0 && b[b.length - 1].innerText.replace(/[^0-9A-Za-z]/g, '') === want"
                " && finals.some(w => s.includes(w)); }", arg=[alnum(expected), list(FINAL)], timeout=WAIT_MS)
        except Exception as e:
            raise AssertionError(f"not seen within {WAIT_MS / 1000:.0f}s: {what} (last answer: "
                                 f"{(self.bot_texts() or [''])[-1]!r}, wanted {expected!r})") from e

    def wait_answer(self, n: int) -> str:
        """Waits for the n-th answer to end (its stats, an error or a stop in the status line)."""
        finals = " || ".join(f"s.includes({w!r})" for w in FINAL)
        try:
            self.page.wait_for_function(
                f"(() => {{ const s = document.querySelector('#status').innerText;"
                f" return document.querySelectorAll('#chat [data-testid=bot]').length >= {n} && ({finals}); }})()",
                timeout=WAIT_MS)
        except Exception as e:
            raise AssertionError(f"answer {n} did not end within {WAIT_MS / 1000:.0f}s (status line: "
                                 f"{self.status()!r}, {self.bot_count()} answers shown)") from e
        return self.status()

    def stats(self) -> tuple[int, int]:
        m = re.search(r"(\d+) prompt tokens, (\d+) completion tokens, [\d.]+ tok/s", self.status())
        assert m, f"no token counts and speed in the status line: {self.status()!r}"
        return int(m.group(1)), int(m.group(2))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

