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
