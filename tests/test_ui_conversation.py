"""The web chat's plain parts: history -> OpenAI messages and Chatbot messages, the SSE parser,
the server's error JSON as a message, and the login key ring."""

from __future__ import annotations

import base64
import json

import pytest

from ui.client import AnswerStats, APIRequestError, _parse_sse, error_message
from ui.conversation import Conversation


def _png(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_messages_carry_images_as_data_urls_and_skip_refused_turns(tmp_path):
    conv = Conversation()
    first = conv.add("what is this?", [_png(tmp_path, "a.png", b"\x89PNG-a"), _png(tmp_path, "b.jpg", b"jpeg-b")])
    first.answer, first.done = "a cat", True
    refused = conv.add("again", [_png(tmp_path, "bad.png", b"nope")])
    refused.error, refused.done = "the server refused the request (400): bad image", True
    conv.add("and now?")
    messages = conv.openai_messages("  be brief ")
    assert messages[0] == {"role": "system", "content": "  be brief "}
    parts = messages[1]["content"]
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG-a").decode()
    assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert parts[2] == {"type": "text", "text": "what is this?"}
    assert messages[2:] == [{"role": "assistant", "content": "a cat"}, {"role": "user", "content": "and now?"}]
    assert Conversation().openai_messages("   ") == []


def test_chatbot_messages_show_images_errors_and_partial_answers(tmp_path):
    conv = Conversation()
    path = _png(tmp_path, "a.png", b"x")
    conv.add("look", [path]).answer = "partial"
    bad = conv.add("x")
    bad.error = "queue is full"
    conv.add("waiting")
    shown = conv.chatbot_messages()
    assert shown[0] == {"role": "user", "content": [{"path": path}, "look"]}
    assert shown[1] == {"role": "assistant", "content": "partial"}
    assert shown[3] == {"role": "assistant", "content": "**Error:** queue is full"}
    assert shown[4] == {"role": "user", "content": ["waiting"]} and len(shown) == 5  # no answer yet


def test_retry_undo():
    conv = Conversation()
    turn = conv.add("q")
    turn.answer, turn.error, turn.done = "a", "boom", True
    turn.asked = turn.attempt
    assert conv.reset_last_answer() is turn and (turn.answer, turn.error, turn.done) == ("", None, False)
    assert turn.asked != turn.attempt  # the retry is a new attempt: it gets its own request
    assert conv.pop() is turn and conv.pop() is None and conv.reset_last_answer() is None


def test_sse_parsing_and_usage():
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
    assert _parse_sse("data: " + json.dumps(chunk)).text == "Hel"
    usage = _parse_sse('data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}')
    assert (usage.prompt_tokens, usage.completion_tokens, usage.text) == (7, 3, "")
    assert _parse_sse("data: [DONE]") is None and _parse_sse(": keep-alive") is None and _parse_sse("") is None
    with pytest.raises(APIRequestError, match="engine died"):
        _parse_sse('data: {"error": {"message": "engine died"}}')


def test_error_message_names_status_and_the_servers_words():
    body = json.dumps({"error": {"message": "the queue is full (max_queue_len=1)", "type": "rate_limit_error"}})
    assert error_message(429, body.encode()) == ("the server refused the request (429 server busy): "
                                                 "the queue is full (max_queue_len=1)")
    assert error_message(502, b"<html>Bad Gateway</html>").endswith("(502): <html>Bad Gateway</html>")
    assert error_message(500, b"").endswith("no details")


def test_stats_line():
    stats = AnswerStats(prompt_tokens=10, completion_tokens=21, started=0.0, first_token=0.5, ended=2.5)
    assert stats.line() == "10 prompt tokens, 21 completion tokens, 10.0 tok/s, first token after 0.50 s"
    assert "no usage" in AnswerStats().line()


def test_key_ring_binds_each_user_to_the_key_it_logged_in_with():
    pytest.importorskip("gradio")
    from ui.mount import KeyRing

    ring = KeyRing(("k1", "k2"))
    assert not ring.login("eve", "k3") and ring.key_for("eve") is None
    assert ring.login("ann", "k1") and ring.login("ann", "k1") and ring.key_for("ann") == "k1"
    assert not ring.login("ann", "k2") and ring.key_for("ann") == "k1"  # no borrowing another key
    assert ring.login("bob", "k2") and ring.key_for("bob") == "k2" and ring.key_for(None) is None
