"""Training/held-out text: the by-file split and the fixed-length sequences cut from files."""

import numpy as np

from mlx_kvpred.data import split_files, tokenize_files


class ByteTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


def write_files(tmp_path) -> list[str]:
    files = []
    for i, size in enumerate([1000, 40, 95, 300, 64]):  # one long file, one too short, others 1-4 sequences
        path = tmp_path / f"f{i}.txt"
        path.write_bytes(np.random.default_rng(i).integers(32, 127, size).astype(np.uint8).tobytes())
        files.append(str(path))
    return files


def test_sequences_per_file_caps_each_file_with_whole_aligned_chunks(tmp_path):
    files = write_files(tmp_path)
    all_seqs = tokenize_files(files, ByteTokenizer(), seq_len=64)
    assert len(all_seqs) == 15 + 0 + 1 + 4 + 1
    capped = tokenize_files(files, ByteTokenizer(), seq_len=64, per_file=2)
    assert len(capped) == 2 + 0 + 1 + 2 + 1
    # every capped sequence is one of the uncapped, aligned chunks, none repeated
    rows = {tuple(r) for r in all_seqs}
    assert all(tuple(r) in rows for r in capped) and len({tuple(r) for r in capped}) == len(capped)
    # seeded: the same call gives the same choice
    assert np.array_equal(capped, tokenize_files(files, ByteTokenizer(), seq_len=64, per_file=2))
    assert len(tokenize_files(files, ByteTokenizer(), seq_len=64, per_file=1, max_sequences=3)) == 3


def test_split_is_by_file_and_deterministic(tmp_path):
    files = [f"/data/{i}.py" for i in range(200)]
    split = split_files(files)
    assert sorted(split.train_files + split.heldout_files) == sorted(files)
    assert not set(split.train_files) & set(split.heldout_files)
    assert 5 <= len(split.heldout_files) <= 40 and split_files(files).heldout_files == split.heldout_files


class CharTokenizer:
    """A tokenizer of characters (encode, decode), with or without a chat template."""

    def __init__(self, chat: bool):
        self.chat_template = "<chat>" if chat else None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


def test_fact_chats_state_each_fact_once_and_answer_the_question(tmp_path):
    """A fact chat: 1-3 facts about different people in a training document, a question about one of them, and
    the answer holding that fact's value; shards are seeded and resume without rewriting."""
    import json

    from mlx_kvpred.selfdata import FACT_NAMES, fact_chat, generate_fact_chats

    doc = ". ".join(f"Sentence {i} of a plain document" for i in range(60)) + "."
    for chat in (True, False):
        counts = set()
        for seed in range(30):
            text, value = fact_chat(doc, np.random.default_rng(seed), CharTokenizer(chat))
            prompt, answer = (text.split("</user><assistant>") if chat else text.split("\nAnswer: "))
            named = [n for n in FACT_NAMES if n in prompt]
            counts.add(len(named))
            assert all(prompt.count(n) == 2 if n in answer else prompt.count(n) == 1 for n in named), text
            assert value in answer and prompt.count(value) >= 1
            asked = next(n for n in named if n in answer)
            stated = next(s for s in prompt.split(". ") if asked in s)  # the fact's sentence, in the document
            assert value in stated and (prompt.startswith("<user>Sentence 0") if chat else
                                        prompt.startswith("Sentence 0"))
        assert counts == {1, 2, 3}

    files = []
    for i in range(6):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(doc.replace("plain", f"plain{i}"))
    out = tmp_path / "facts"
    shards = generate_fact_chats(CharTokenizer(True), out, files=[str(f) for f in files], count=3, lengths=[200])
    rows = [json.loads(line) for line in shards[0].read_text().splitlines()]
    assert len(rows) == 3 and all(r["doc_tokens"] == 200 and r["answer"] in r["text"].split("<assistant>")[1]
                                  for r in rows)
    assert len({r["source"] for r in rows}) == 3  # one document per file
    stamp = shards[0].stat().st_mtime_ns
    assert generate_fact_chats(CharTokenizer(True), out, files=[str(f) for f in files], count=3,
                               lengths=[200]) == shards and shards[0].stat().st_mtime_ns == stamp
