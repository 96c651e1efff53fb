"""`meshpy chat` in a real terminal (tmux): a two-turn conversation whose replies are the
greedy replies to the whole conversation so far, with a local model and through a mesh;
/reset, an unknown command and /exit."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from meshpy.generation import Model
from meshpy.mesh.launcher import LocalMesh
from tests.fixtures.terminal import Terminal
from tests.test_config_file import cli_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux; .ci/run installs it)"),
]

TURNS = ("What is the capital of France?", "And of Germany?")
MAX_TOKENS = 24


def expected_replies(gguf: Path) -> list[str]:
    """The greedy reply to each turn, given the conversation before it."""
    model = Model.load(gguf, threads=1)
    messages: list[dict[str, str]] = []
    replies = []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        reply = model.generate(messages, max_tokens=MAX_TOKENS).text
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


@pytest.mark.parametrize("where", ["local", "mesh"])
def test_a_conversation_in_the_terminal(smollm2_gguf: Path, tmp_path: Path, where: str) -> None:
    replies = expected_replies(smollm2_gguf)
    assert "Paris" in replies[0]
    with LocalMesh() as mesh:
        args = ["chat", "-m", str(smollm2_gguf), "-n", str(MAX_TOKENS), "-t", "1"]
        if where == "mesh":
            mesh.start_bootstrap()
            for layers in ("0-14", "15-29"):
                mesh.add_worker(smollm2_gguf, layers=layers, threads=1)
            args += ["--bootstrap", mesh.bootstrap_addr]
        command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "meshpy", *args])
        term = Terminal(f"meshpy-chat-{where}-{os.getpid()}", command, cli_env(tmp_path))
        try:
            term.wait_for(r"chatting with .*/reset starts over", 120)
            for i, (turn, reply) in enumerate(zip(TURNS, replies)):
                term.type(turn)
                screen = term.wait_for(rf"(?s)(tokens, [\d.]+ tok/s\].*){{{i + 1}}}\n>$", 60)
                assert f"> {turn}\n{reply}\n" in screen, screen
            term.type("/what")
            term.wait_for(r"unknown command /what")
            term.type("/reset")
            term.wait_for(r"\[conversation reset\]")
            term.type("/exit")
            term.wait_for(r"EXITED 0")
        finally:
            term.close()
