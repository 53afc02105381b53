"""The `lmq` command, run as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lmq(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("lmq") or str(Path(sys.executable).with_name("lmq"))
    # The console script imports the installed (editable) lmq: point it at this checkout's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_commands_and_options():
    top = _lmq("--help")
    assert top.returncode == 0 and "generate" in top.stdout and "chat" in top.stdout
    gen = _lmq("generate", "--help")
    for opt in ("--model", "--backend", "--max-num-batched-tokens", "--num-kv-blocks", "--temperature", "--stop"):
        assert opt in gen.stdout


def test_generate_on_default_model():
    r = _lmq("generate", "--chat", "What is the capital of France?", "--max-tokens", "24", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_keeps_history_and_streams():
    script = "What is the capital of France?\nWhat is its population?\n/exit\n"
    r = _lmq("chat", "--max-tokens", "24", "--device", "cpu", stdin=script)
    assert r.returncode == 0, r.stderr
    answers = [a for a in r.stdout.split("> ") if a.strip()]
    assert len(answers) == 2
    assert "Paris" in answers[0]
    assert "France" in answers[1]  # "its" only means France through the first turn


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--model", "/nonexistent/model"], "does not exist"),
    (["generate", "hi", "--temperature", "-1"], "temperature=-1.0 is invalid"),
])
def test_errors_are_one_clear_line(args, message):
    r = _lmq(*args, "--device", "cpu")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
