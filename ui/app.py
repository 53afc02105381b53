"""The Gradio chat page: history with images, streamed answers, stop / retry / undo / edit / new
chat, the model or adapter picker, sampling controls, the system prompt and the last answer's
token counts and speed.

Every piece of a session (its Conversation) lives in gr.State, which Gradio keeps per page
load: two browser sessions never see each other's history. The server is reached only through
a ChatClient that `client_for(request)` makes, so the same page runs mounted on lmq's server
(loopback, the user's own API key) or alone against any OpenAI-compatible server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import gradio as gr

from ui.client import AnswerStats, APIRequestError, ChatClient, Sampling
from ui.conversation import Conversation

ClientFactory = Callable[[gr.Request], ChatClient]
# System fonts only: the page must not reach for web fonts on machines without the internet.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


class ChatHandlers:
    """The page's event handlers; `outputs` order: (chatbot, conversation state, status line)."""

    def __init__(self, client_for: ClientFactory) -> None:
        self.client_for = client_for

    async def refresh_models(self, current: str | None, request: gr.Request) -> tuple[dict, str]:
        try:
            models = await self.client_for(request).models()
        except APIRequestError as e:
            gr.Warning(str(e))
            return gr.update(), f"**Error:** {e}"
        value = current if current in models else (models[0] if models else None)
        return gr.update(choices=models, value=value), f"{len(models)} model(s) served: {', '.join(models)}"

    def add_message(self, message: dict | None, conv: Conversation) -> tuple:
        text, files = (message or {}).get("text", "").strip(), (message or {}).get("files") or []
        if not text and not files:
            return gr.update(), conv.chatbot_messages(), conv, "Type a message or attach an image first."
        conv.add(text, [f if isinstance(f, str) else f["path"] for f in files])
        return gr.update(value=None), conv.chatbot_messages(), conv, "…"

    async def answer(self, conv: Conversation, model: str | None, system: str, temperature: float, top_p: float,
                     max_tokens: float, seed: float | None, request: gr.Request) -> AsyncIterator[tuple]:
        """Streams the answer to the last turn into the history. A refusal by the server becomes
        that turn's error (shown in the chat and as a warning); the chat goes on from there."""
        turn = conv.turns[-1] if conv.turns else None
        if turn is None or turn.done or turn.asked == turn.attempt:
            return  # nothing to answer, or this attempt is already being answered (a double click)
        turn.asked = attempt = turn.attempt
        if not model:
            turn.error, turn.done = "no model selected: the model list is empty (press 'Reload the model list')", True
            yield conv.chatbot_messages(), conv, f"**Error:** {turn.error}"
            return
        seed = None if seed is None or seed < 0 else int(seed)
        sampling = Sampling(float(temperature), float(top_p), int(max_tokens), seed)
        stats = AnswerStats(started=time.monotonic())
        stream = self.client_for(request).stream_chat(model, conv.openai_messages(system), sampling)
        try:
            async with aclosing(stream):  # leaving early closes the HTTP stream: the server aborts
                async for delta in stream:
                    if turn.attempt != attempt:
                        return  # retried meanwhile: the newer attempt owns the turn
                    if delta.completion_tokens is not None:
                        stats.prompt_tokens, stats.completion_tokens = delta.prompt_tokens, delta.completion_tokens
                    if delta.text or delta.completion_tokens:
                        # the first token is the first delta with text, or the usage when no token
                        # had text of its own (e.g. a lone end-of-turn token): speed is then 0
                        stats.first_token = stats.first_token or time.monotonic()
                    if delta.text:
                        turn.answer += delta.text
                        yield conv.chatbot_messages(), conv, "…"
        except (APIRequestError, ValueError) as e:  # ValueError: a stream that is not JSON
            if turn.attempt == attempt:
                turn.error, turn.done = str(e), True
                gr.Warning(str(e))
                yield conv.chatbot_messages(), conv, f"**Error:** {e}"
            return
        if turn.attempt == attempt:
            stats.ended, turn.done = time.monotonic(), True
            yield conv.chatbot_messages(), conv, f"{model}: {stats.line()}"

    def stopped(self, conv: Conversation) -> tuple:
        # The answer's task is cancelled at the same time (cancels=...), which closes its HTTP
        # stream: the server aborts the request. What came so far stays in the history.
        if conv.turns:
            conv.turns[-1].done = True
        return conv.chatbot_messages(), conv, "Stopped."

    def retry(self, conv: Conversation) -> tuple:
        conv.reset_last_answer()
        return conv.chatbot_messages(), conv, "…" if conv.turns else "Nothing to retry."

    def undo(self, conv: Conversation) -> tuple:
        conv.pop()
        return conv.chatbot_messages(), conv, ""

    def edit(self, conv: Conversation) -> tuple:
        """Takes the last question back into the input box (text and images) to change and resend."""
        turn = conv.pop()
        if turn is None:
            return gr.update(), conv.chatbot_messages(), conv, "Nothing to edit."
        box = {"text": turn.text, "files": [im.path for im in turn.images]}
        return box, conv.chatbot_messages(), conv, "Editing the last message: change it and press Enter."

    def new_chat(self) -> tuple:
        conv = Conversation()
        return None, conv.chatbot_messages(), conv, "New chat."


def build_app(client_for: ClientFactory, title: str = "lmq chat") -> gr.Blocks:
    h = ChatHandlers(client_for)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        conv = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(elem_id="chat", label=title, height=560, buttons=["copy", "copy_all"],
                                     feedback_options=None, placeholder="Ask anything; attach, drop or paste images.")
                box = gr.MultimodalTextbox(elem_id="input", file_types=["image"], file_count="multiple",
                                           placeholder="Message (Enter sends, Shift+Enter: new line)",
                                           show_label=False, sources=["upload"])
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop", variant="stop", size="sm")
                    retry = gr.Button("Retry", elem_id="retry", size="sm")
                    undo = gr.Button("Undo", elem_id="undo", size="sm")
                    edit = gr.Button("Edit last", elem_id="edit", size="sm")
                    new = gr.Button("New chat", elem_id="new-chat", size="sm")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=1):
                model = gr.Dropdown(label="Model or adapter", choices=[], elem_id="model")
                reload = gr.Button("Reload the model list", elem_id="reload-models", size="sm")
                system = gr.Textbox(label="System prompt", lines=3, elem_id="system")
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p", elem_id="top_p")
                max_tokens = gr.Slider(1, 4096, value=256, step=1, label="max tokens", elem_id="max_tokens")
                seed = gr.Number(-1, precision=0, label="seed (-1: random)", elem_id="seed")

        shown = [chatbot, conv, status]
        settings = [conv, model, system, temperature, top_p, max_tokens, seed]
        # The answers run without a concurrency cap: the server batches them, and one session's
        # long answer must not queue another session's.
        answering = dict(fn=h.answer, inputs=settings, outputs=shown, concurrency_limit=None)
        sent = box.submit(h.add_message, [box, conv], [box, *shown], queue=False).then(**answering)
        retried = retry.click(h.retry, conv, shown, queue=False).then(**answering)
        stop.click(h.stopped, conv, shown, cancels=[sent, retried], queue=False)
        undo.click(h.undo, conv, shown, queue=False)
        edit.click(h.edit, conv, [box, *shown], queue=False)
        new.click(h.new_chat, None, [box, *shown], cancels=[sent, retried], queue=False)
        chatbot.clear(h.new_chat, None, [box, *shown], cancels=[sent, retried], queue=False)
        reload.click(h.refresh_models, model, [model, status])
        demo.load(h.refresh_models, model, [model, status])
    demo.queue(default_concurrency_limit=None)
    return demo
