"""Training text: collect files, split train/held-out by file, tokenize into fixed-length sequences."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .errors import KVPredError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".rst")
EXCLUDE = ("human_eval", "humaneval")  # never train on the benchmark


@dataclass
class TextSplit:
    train_files: list[str] = field(default_factory=list)
    heldout_files: list[str] = field(default_factory=list)
    rule: str = "sha1(path) % 10 == 0 -> held-out"


def default_sources() -> list[str]:
    """Text every Debian/Python machine has: Python's lib dir (the stdlib sources, and with them whatever
    site-packages holds, so the data depends on what is installed) and /usr/share/doc."""
    return [sysconfig.get_paths()["stdlib"], "/usr/share/doc"]


def collect_files(sources: Iterable[str]) -> list[str]:
    """Files of the text suffixes under each source (file, dir or glob), sorted, HumanEval excluded."""
    files: set[str] = set()
    for src in sources:
        paths = glob.glob(src, recursive=True) if any(c in src for c in "*?[") else [src]
        if not paths:
            raise KVPredError(f"data: nothing matches {src}", "data")
        for p in paths:
            if os.path.isdir(p):
                for root, _, names in os.walk(p):
                    files.update(os.path.join(root, n) for n in names if n.endswith(TEXT_SUFFIXES))
            elif os.path.isfile(p):
                files.add(p)
            else:
                raise KVPredError(f"data: not a file or directory: {p}", "data")
    files = {f for f in files if not any(x in f.lower() for x in EXCLUDE)}
    if not files:
        raise KVPredError(f"data: no {'/'.join(TEXT_SUFFIXES)} files found in {', '.join(sources)}", "data")
    return sorted(files)


def split_files(files: list[str], heldout_every: int = 10) -> TextSplit:
    """Deterministic split by file path hash, so held-out text never leaks into training."""
    split = TextSplit(rule=f"sha1(path) % {heldout_every} == 0 -> held-out")
    for f in files:
        h = int(hashlib.sha1(f.encode()).hexdigest(), 16)
        (split.heldout_files if h % heldout_every == 0 else split.train_files).append(f)
    return split


def read_text(path: str) -> str:
    """File text; .jsonl yields the `text` (or `content`) field of each line. Unreadable files give ''."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="strict") as fh:
            raw = fh.read()
    except (OSError, UnicodeDecodeError):
        return ""
    if path.endswith(".jsonl"):
        out = []
        for line in raw.splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(str(obj.get("text") or obj.get("content") or ""))
        return "\n\n".join(out)
    return raw


def tokenize_files(files: list[str], tokenizer, *, seq_len: int, max_sequences: int | None = None,
                   per_file: int | None = None, seed: int = 0) -> np.ndarray:
    """Tokenize files (in a seeded shuffled order) into non-overlapping sequences of seq_len tokens,
    one document never spilling into the next; `per_file` keeps a seeded random choice of at most that many
    of each file's sequences (in file order), so a few long files cannot fill the set. Returns int32 (n, seq_len)."""
    order = np.random.default_rng(seed).permutation(len(files))
    pick = np.random.default_rng([seed, 1])
    sequences: list[np.ndarray] = []
    for i in order:
        text = read_text(files[i])
        if len(text) < seq_len:  # too short to fill a sequence (chars >= tokens)
            continue
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
        starts = np.arange(0, len(ids) - seq_len + 1, seq_len)
        if per_file is not None and len(starts) > per_file:
            starts = np.sort(pick.choice(starts, per_file, replace=False))
        sequences.extend(ids[start:start + seq_len] for start in starts)
        if max_sequences is not None and len(sequences) >= max_sequences:
            break
    if not sequences:
        raise KVPredError(f"data too short: no file gives a full {seq_len}-token sequence ({len(files)} files)")
    out = np.stack(sequences)
    return out[:max_sequences] if max_sequences is not None else out


def tokenize_records(files: list[str], tokenizer, *, max_len: int, min_len: int = 2) -> list[np.ndarray]:
    """Each record of .jsonl files (its `text`) as one sequence, e.g. a document chat whose question and answer
    come last: its last `max_len` tokens; records under `min_len` tokens are left out."""
    out = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise KVPredError(f"chat_data: cannot read {f} ({e.__class__.__name__})", "chat_data") from e
        for line in lines:
            try:
                text = json.loads(line).get("text", "")
            except (json.JSONDecodeError, AttributeError):
                continue
            ids = tokenizer.encode(text, add_special_tokens=False)[-max_len:]
            if len(ids) >= min_len:
                out.append(np.asarray(ids, dtype=np.int32))
    if not out:
        raise KVPredError(f"chat_data: no records of {min_len}+ tokens in {len(files)} files", "chat_data")
    return out
