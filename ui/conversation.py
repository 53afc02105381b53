"""One browser session's chat: turns of (user text + images, assistant answer), turned into
OpenAI chat messages for the server and into Gradio Chatbot messages for the page.

Pure Python (no gradio import): a Conversation is plain data that gr.State keeps per session,
so two browser sessions never share one.
"""

from __future__ import annotations

import base64
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Image:
    path: str  # the uploaded file on the UI's side, shown in the history
    data_url: str  # what the server gets: the file's bytes, base64


def image_from_file(path: str) -> Image:
    """Reads the uploaded file once: the data URL carries its exact bytes (the server decodes and
    validates them; a broken file is its 400 to report, not ours)."""
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return Image(path, f"data:{mime};base64,{data}")


@dataclass
class Turn:
    text: str
    images: list[Image] = field(default_factory=list)
    answer: str = ""
    error: str | None = None  # the server refused this turn: shown, never sent back to the model
    done: bool = False  # the answer ended (finished, stopped or failed)
    attempt: int = 0  # bumped by every retry: an answer still streaming for an older one stops
    asked: int = -1  # the attempt a request was sent for: a second click never sends it again

    def user_message(self) -> dict:
        if not self.images:
            return {"role": "user", "content": self.text}
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": im.data_url}} for im in self.images]
        if self.text:
            parts.append({"type": "text", "text": self.text})
        return {"role": "user", "content": parts}


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def add(self, text: str, image_paths: list[str] = ()) -> Turn:
        turn = Turn(text, [image_from_file(p) for p in image_paths])
        self.turns.append(turn)
        return turn

    def openai_messages(self, system: str = "") -> list[dict]:
        """The request for the last turn: the system prompt, every earlier turn that got an
        answer (refused turns are left out: the model never saw them), then the last question."""
        messages: list[dict] = [{"role": "system", "content": system}] if system.strip() else []
        for turn in self.turns[:-1]:
            if turn.error is None:
                messages.append(turn.user_message())
                messages.append({"role": "assistant", "content": turn.answer})
        if self.turns:
            messages.append(self.turns[-1].user_message())
        return messages

    def reset_last_answer(self) -> Turn | None:
        """For retry: the last turn asks again, its answer and error cleared."""
        if not self.turns:
            return None
        last = self.turns[-1]
        last.answer, last.error, last.done = "", None, False
        last.attempt += 1
        return last

    def pop(self) -> Turn | None:
        """For undo and edit: removes the last turn and returns it."""
        return self.turns.pop() if self.turns else None

    def chatbot_messages(self) -> list[dict]:
        """Gradio Chatbot messages: a user message (images, then text) and the answer per turn."""
        out: list[dict] = []
        for turn in self.turns:
            content: list = [{"path": im.path} for im in turn.images]
            if turn.text:
                content.append(turn.text)
            out.append({"role": "user", "content": content})
            if turn.error is not None:
                out.append({"role": "assistant", "content": f"**Error:** {turn.error}"})
            elif turn.answer or turn.done:
                out.append({"role": "assistant", "content": turn.answer})
        return out
