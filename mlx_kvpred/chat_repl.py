"""`kvpred-mlx chat`: an interactive loop over a ChatSession, with idle-time cache repair between turns."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

from .errors import KVPredError, cli_message
from .pipeline import MODES
from .session import ChatSession

HELP = """commands:
  /mode kvp|base|auto   how new turns are prefilled (auto: kvp only where it saves time)
  /stats                tokens cached, predicted, repaired; TTFT of each turn
  /repair               recompute predicted K/V with the base now (also done while you type)
  /save FILE [--force]  save the session (.safetensors); --force overwrites
  /load FILE            load a saved session
  /file PATH [text]     send a file's contents, then the text, as one message
  /reset                forget the conversation
  /help                 this list
  \"\"\"                   start and end a multi-line message
Ctrl-C stops an answer; Ctrl-D quits."""


class IdleRepair:
    """Repairs the session's predicted K/V in a background thread while the REPL waits for input; stop() waits
    for the repair step in progress, not for the whole repair."""

    def __init__(self, session: ChatSession, enabled: bool = True):
        self.session, self.enabled = session, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.enabled or self.session.pending_repair == 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._repair, daemon=True)
        self._thread.start()

    def _repair(self) -> None:
        import mlx.core as mx

        try:
            self.session.repair(stop=self._stop)
        finally:
            mx.clear_streams()  # MLX needs a thread's streams released before it ends, or exit may abort

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


@contextmanager
def sigint_flag() -> Iterator[threading.Event]:
    """While inside, Ctrl-C sets the event instead of raising, so an answer stops cleanly at the next token."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, or the lines between two \"\"\" lines."""
    line = read(">>> ")
    if line.strip() != '"""':
        return line
    lines = []
    while (line := read("... ")).strip() != '"""':
        lines.append(line)
    return "\n".join(lines)


def run_repl(session: ChatSession, *, max_tokens: int, sampler: Callable | None, verbose: bool = False,
             idle_repair: bool = True, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read messages and commands until EOF (Ctrl-D)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    pipe = session.pipe
    print(f"kvpred-mlx chat · {pipe.base.source} · bundle {pipe.bundle.path if pipe.bundle else '-'} · mode "
          f"{session.mode}. /help for commands, Ctrl-D to quit.", file=out, flush=True)
    repairer = IdleRepair(session, idle_repair)
    if threading.current_thread() is threading.main_thread():  # started with SIGINT ignored (e.g. `&`): restore
        signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        try:
            message = read_message(read)
        except EOFError:
            print(file=out)
            break
        except KeyboardInterrupt:
            print("^C (Ctrl-D quits)", file=out, flush=True)
            continue
        repairer.stop()
        if not message.strip():
            continue
        try:
            if message.startswith("/"):
                session, message = command(session, message, out)
                repairer.session = session
                if message is None:
                    continue
            answer(session, message, max_tokens=max_tokens, sampler=sampler, verbose=verbose, out=out)
        except KVPredError as e:
            print(f"error: {cli_message(e)}", file=out, flush=True)
        repairer.start()
    repairer.stop()


def answer(session: ChatSession, message: str, *, max_tokens: int, sampler: Callable | None, verbose: bool,
           out: TextIO) -> None:
    """Stream the answer; Ctrl-C stops it (what was shown stays in the conversation)."""
    last = None
    with sigint_flag() as interrupted:
        for last in session.stream(message, max_tokens=max_tokens, sampler=sampler):
            print(last.text, end="", file=out, flush=True)
            if interrupted.is_set():
                print(" [stopped]", end="", file=out)
                break
    print(file=out, flush=True)
    if verbose and last is not None:
        t = session.turns[-1]
        print(f"[{t.mode}: {t.reason}; {t.cached_tokens} cached + {t.new_tokens} new tokens "
              f"({t.predicted_tokens} predicted); TTFT {t.ttft * 1e3:.0f} ms; {t.generation_tokens} tokens at "
              f"{t.generation_tps:.1f} tokens/s]", file=out, flush=True)


def command(session: ChatSession, line: str, out: TextIO) -> tuple[ChatSession, str | None]:
    """Run a /command; returns the session from then on (/load: the loaded one) and a message to send (/file)."""
    name, *args = line.split()
    if name == "/help":
        print(HELP, file=out)
    elif name == "/reset":
        session.reset()
        print("conversation cleared", file=out)
    elif name == "/mode":
        if len(args) != 1 or args[0] not in MODES or args[0] == "aux":
            raise KVPredError("usage: /mode kvp|base|auto")
        session.set_mode(args[0])
        print(f"mode {session.mode}", file=out)
    elif name == "/stats":
        print_stats(session, out)
    elif name == "/repair":
        n = session.repair()
        print(f"repaired {n} tokens", file=out)
    elif name == "/save":
        if not args or len(args) > 2 or (len(args) == 2 and args[1] != "--force"):
            raise KVPredError("usage: /save FILE.safetensors [--force]")
        if len(args) == 1 and Path(args[0]).exists():
            raise KVPredError(f"{args[0]} already exists (/save {args[0]} --force replaces it)")
        session.save(args[0], overwrite=len(args) == 2)
        print(f"saved {len(session.tokens)} tokens to {args[0]}", file=out)
    elif name == "/load":
        if len(args) != 1:
            raise KVPredError("usage: /load FILE.safetensors")
        session = ChatSession.load(session.pipe, args[0], mode=session.mode, exact_tail=session.exact_tail,
                                   kvp_min_tokens=session.kvp_min_tokens, ttft_budget=session.ttft_budget)
        print(f"loaded {len(session.tokens)} tokens, {len(session.turns)} turns from {args[0]}", file=out)
    elif name == "/file":
        if not args:
            raise KVPredError("usage: /file PATH [text]")
        path = Path(args[0])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KVPredError(f"/file: cannot read {path} as UTF-8 text ({e.__class__.__name__})") from None
        return session, text + ("\n\n" + line.split(None, 2)[2] if len(args) > 1 else "")
    else:
        raise KVPredError(f"unknown command {name} (/help lists them)")
    out.flush()
    return session, None


def print_stats(session: ChatSession, out: TextIO) -> None:
    print(f"{len(session.tokens)} tokens cached: {session.predicted_tokens} predicted, {session.pending_repair} "
          f"pending repair, {session.repaired_tokens} repaired", file=out)
    if session.turns:
        print(f"{'turn':>4} {'mode':<5} {'cached':>7} {'new':>6} {'predicted':>9} {'TTFT ms':>8} {'tokens':>6} "
              f"{'tok/s':>6}", file=out)
    for i, t in enumerate(session.turns, 1):
        print(f"{i:>4} {t.mode:<5} {t.cached_tokens:>7} {t.new_tokens:>6} {t.predicted_tokens:>9} "
              f"{t.ttft * 1e3:>8.0f} {t.generation_tokens:>6} {t.generation_tps:>6.1f}", file=out)
