"""Training text the base model writes itself, sampled in batches:
- chat answers to varied short prompts (`generate_chat_data`);
- document chats (`generate_document_chats`): a training-split file cut to N tokens, a question about it, and the
  base's answer, as one chat turn: the long chat prompts KV prediction is used on;
- fact chats (`generate_fact_chats`): a training-split file with facts stated once in it, a question about one and
  the answer that states it (written from the fact, not by the base), to train retrieval from a predicted cache.

Its own chat-formatted answers are the text the runtime sees in `generate` (chat template on), and they match
the base's own distribution, which file text on a fresh machine (code, docs) does not. Shards of
`SHARD_SIZE` conversations are written atomically as .jsonl (`{"text": ...}` per line), so an interrupted
run resumes at the next missing shard and the train/held-out split by file gets shards on both sides.
"""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .atomic import atomic_write
from .errors import KVPredError
from .loading import LoadedModel

SHARD_SIZE = 16  # conversations per .jsonl file
INSTRUCTIONS = (
    "Explain {t} to a beginner.", "Write a short story about {t}.", "What are the pros and cons of {t}?",
    "Give me three facts about {t}.", "Write a Python function related to {t}, with a docstring.",
    "Summarize the history of {t} in a paragraph.", "Write a haiku about {t}.", "How does {t} work?",
    "Compare {t} with something similar.", "Write an email to a friend about {t}.",
    "List five questions a student might ask about {t}, and answer one.", "What is a common mistake with {t}?",
    "Describe {t} in simple words.", "Write a dialogue between two people discussing {t}.",
    "Give step-by-step instructions involving {t}.", "Why is {t} important?",
    "Write a product description for something inspired by {t}.", "Tell me a joke about {t}.",
    "Write a short poem about {t}.", "What would a scientist say about {t}?",
    "Write Python code that uses {t} and explain it.", "What is the difference between {t} and a list?",
    "Give a real-world example of {t}.", "Write a tweet about {t}.",
)
TOPICS = (
    "the water cycle", "photosynthesis", "black holes", "the French Revolution", "volcanoes", "honey bees",
    "recursion", "sorting algorithms", "binary search", "hash tables", "the Python dictionary", "regular expressions",
    "unit testing", "version control with git", "the internet", "electric cars", "solar power", "climate change",
    "the Roman Empire", "chess", "football", "cooking pasta", "bread baking", "coffee", "tea ceremonies",
    "the human heart", "sleep", "exercise", "meditation", "learning a language", "the moon landing",
    "Mars", "dinosaurs", "the ocean", "rainforests", "deserts", "mountains", "cats", "dogs", "friendship",
    "money", "inflation", "the stock market", "democracy", "libraries", "music", "the piano", "painting",
    "photography", "movies", "video games", "robots", "machine learning", "neural networks", "prime numbers",
    "fractions", "geometry", "probability", "the speed of light", "gravity", "magnets", "electricity",
    "the periodic table", "DNA", "vaccines", "the immune system", "bicycles", "trains", "airplanes",
    "city planning", "gardening", "recycling", "time management", "job interviews", "writing a resume",
    "public speaking", "birthdays", "winter", "the Olympic games", "pirates", "castles", "ancient Egypt",
    "JSON files", "web servers", "databases", "linked lists", "string formatting", "file handling in Python",
)


def chat_prompts(count: int, *, seed: int = 0) -> list[str]:
    """`count` distinct instruction x topic prompts in a seeded order."""
    pairs = [(i, t) for i in range(len(INSTRUCTIONS)) for t in range(len(TOPICS))]
    if count > len(pairs):
        raise KVPredError(f"count {count}: at most {len(pairs)} distinct prompts", "count")
    order = np.random.default_rng(seed).permutation(len(pairs))[:count]
    return [INSTRUCTIONS[pairs[k][0]].format(t=TOPICS[pairs[k][1]]) for k in order]


def chat_text(tokenizer, prompt: str, response: str) -> str:
    """The conversation as the chat template writes it (what `generate` feeds the model, plus the answer)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)


def generate_chat_data(base: LoadedModel, out: str | Path, *, count: int = 512, max_tokens: int = 256,
                       temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                       progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write `count` sampled chat conversations of the base as .jsonl shards under `out`; existing shards are
    kept (resume). Returns every shard path. `progress(n)` is called with conversations done per shard."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    from .pipeline import chat_prompt_ids

    tok = base.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise KVPredError(f"{base.source}: the model has no chat template, so it cannot write chat data")
    if count < 1 or max_tokens < 1:
        raise KVPredError("count and max_tokens must be >= 1", "count", "max_tokens")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KVPredError(f"out {out} exists and is not a directory", "out")
    prompts = chat_prompts(count, seed=seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    shards = []
    for s in range(0, count, SHARD_SIZE):
        path = out / f"chat-{s // SHARD_SIZE:05d}.jsonl"
        shards.append(path)
        batch = prompts[s:s + SHARD_SIZE]
        if path.is_file():
            if progress:
                progress(len(batch))
            continue
        mx.random.seed(seed * 100003 + s)  # each shard reproducible on its own (resume gives the same text)
        ids = [chat_prompt_ids(tok, p) for p in batch]
        result = batch_generate(base.model, tok, ids, max_tokens=max_tokens, sampler=sampler)
        lines = [json.dumps({"text": chat_text(tok, p, r.strip()), "prompt": p}) for p, r in zip(batch, result.texts)]
        atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        if progress:
            progress(len(batch))
    return shards


# Questions for training document chats; `eval --tasks docqa` asks others (bench/eval_docqa.py).
DOCUMENT_QUESTIONS = (
    "Explain the main idea of the text above.", "What are the most important details in this text?",
    "Give a short summary of the passage above.", "What does the passage tell us about {x}?",
    "Continue the text above with one more paragraph.", "Explain the text above to a beginner.",
    "Which questions does this text answer?", "Describe the purpose of the text above.",
    "Where in the text is {x} mentioned, and why?", "Make a bulleted list of the facts in the passage.",
)
MENTION = re.compile(r"\b(?:[A-Z][a-zA-Z]{3,}|\d{2,})\b")  # a name or a number a document states
DOCUMENT_LENGTHS = (256, 512, 1024, 2048)  # document tokens, one length per shard in turn


def document_question(doc: str, rng: np.random.Generator, questions: Sequence[str]) -> str:
    """A seeded question about `doc`; one naming "{x}" gets a name or number the document contains."""
    mentions = sorted(set(MENTION.findall(doc)))
    usable = [q for q in questions if "{x}" not in q or mentions]
    question = usable[int(rng.integers(len(usable)))]
    return question.format(x=mentions[int(rng.integers(len(mentions)))]) if "{x}" in question else question


def document_texts(files: Sequence[str], order: Iterable[int], tokenizer, n: int) -> Iterator[tuple[str, str]]:
    """(file, its first n tokens as text) for the files of `order` (indices into `files`) that have n tokens. An
    iterator `order` is used up as documents are taken (shared by successive calls); a sequence starts over."""
    from .data import read_text

    for i in order:
        text = read_text(files[i])
        if len(text) < n:  # chars >= tokens: too short without tokenizing
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= n:
            yield files[i], tokenizer.decode(ids[:n]).strip()


def document_shards(out: Path, prefix: str, *, files: Sequence[str], tokenizer, count: int, lengths: Sequence[int],
                    seed: int) -> Iterator[tuple[int, int, Path, list[tuple[str, str]]]]:
    """(shard index, document tokens, shard path, its (file, document) pairs) for `count` documents in shards of
    SHARD_SIZE, one length of `lengths` per shard in turn, from `files` in a seeded order. Each shard's documents are
    drawn even when its file exists, so a resumed run picks the same ones for later shards. At least one chat,
    documents of at least 16 tokens."""
    if count < 1 or not lengths or min(lengths) < 16:
        raise KVPredError("count must be >= 1 and doc_lengths >= 16 tokens each", "count", "doc_lengths")
    if out.exists() and not out.is_dir():
        raise KVPredError(f"out {out} exists and is not a directory", "out")
    order = iter(np.random.default_rng(seed).permutation(len(files)))
    for s in range(0, count, SHARD_SIZE):
        k = s // SHARD_SIZE
        n, size = lengths[k % len(lengths)], min(SHARD_SIZE, count - s)
        docs = list(islice(document_texts(files, order, tokenizer, n), size))
        if not docs:
            raise KVPredError(f"data: no more files with {n} tokens for shard {k} ({prefix})", "data")
        yield k, n, out / f"{prefix}-{k:05d}-{n}.jsonl", docs


def generate_document_chats(base: LoadedModel, out: str | Path, *, files: Sequence[str], count: int = 128,
                            lengths: Sequence[int] = DOCUMENT_LENGTHS, max_tokens: int = 64,
                            temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                            progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write `count` document chats as .jsonl shards under `out` (resumable, as generate_chat_data): per shard one
    document length from `lengths` in turn; documents are the first N tokens of `files` (use training-split files:
    these become training text) in a seeded order; the base samples the answer."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    from .pipeline import chat_prompt_ids

    tok = base.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise KVPredError(f"{base.source}: the model has no chat template, so it cannot write chat data")
    if max_tokens < 1:
        raise KVPredError("max_tokens must be >= 1", "max_tokens")
    sampler = make_sampler(temp=temperature, top_p=top_p)
    shards = []
    for k, n, path, docs in document_shards(Path(out), "docchat", files=files, tokenizer=tok, count=count,
                                            lengths=lengths, seed=seed):
        shards.append(path)
        rng = np.random.default_rng([seed, k])
        if path.is_file():
            if progress:
                progress(len(docs))
            continue
        prompts = [f"{doc}\n\n{document_question(doc, rng, DOCUMENT_QUESTIONS)}" for _, doc in docs]
        mx.random.seed(seed * 100003 + k * SHARD_SIZE)  # each shard reproducible on its own
        ids = [chat_prompt_ids(tok, p) for p in prompts]
        result = batch_generate(base.model, tok, ids, max_tokens=max_tokens, sampler=sampler)
        lines = [json.dumps({"text": chat_text(tok, p, r.strip()), "source": f, "doc_tokens": n})
                 for (f, _), p, r in zip(docs, prompts, result.texts)]
        atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        if progress:
            progress(len(docs))
    return shards


# Facts for training fact chats, each about a person. `eval --tasks needle` asks for other things in other words
# (bench/eval_needle.py), so its score stays a test on facts no training chat stated.
FACT_NAMES = ("Alice", "Omar", "Mei", "Lars", "Priya", "Diego", "Hannah", "Kofi", "Yuki", "Ivan", "Sofia", "Tomas",
              "Amara", "Felix", "Leila", "Ravi", "Greta", "Jonas", "Nadia", "Pablo")
FACTS = (  # (statement, question, answer, the value an answer must hold)
    ("{name}'s room number is {n4}.", "What is {name}'s room number?", "{name}'s room number is {n4}.", "{n4}"),
    ("{name} was born in {year}.", "In which year was {name} born?", "{name} was born in {year}.", "{year}"),
    ("The meeting with {name} starts at {time}.", "When does the meeting with {name} start?",
     "The meeting with {name} starts at {time}.", "{time}"),
    ("{name} moved to {city} last spring.", "Which city did {name} move to?", "{name} moved to {city}.", "{city}"),
    ("{name} paid {n3} dollars for the ticket.", "How much did {name} pay for the ticket?",
     "{name} paid {n3} dollars for the ticket.", "{n3}"),
    ("Note: {name}'s account id is {n5}.", "What is {name}'s account id?", "{name}'s account id is {n5}.", "{n5}"),
    ("{name}'s password is {word}{n2}.", "What is {name}'s password?", "{name}'s password is {word}{n2}.",
     "{word}{n2}"),
    ("{name} drives a car with the plate {plate}.", "Which plate does {name}'s car have?",
     "{name}'s car has the plate {plate}.", "{plate}"),
)
FACT_CITIES = ("Lisbon", "Osaka", "Nairobi", "Quito", "Tallinn", "Perth", "Dakar", "Hanoi", "Bergen", "Cusco")
FACT_WORDS = ("maple", "falcon", "cobalt", "pepper", "harbor", "velvet", "quartz", "lantern", "meadow", "cipher")
FACT_LENGTHS = (256, 512, 1024)  # document tokens, one length per shard in turn


def _fact_values(rng: np.random.Generator) -> dict[str, str]:
    """A seeded value for every placeholder FACTS use."""
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    return {"n2": str(rng.integers(10, 100)), "n3": str(rng.integers(100, 1000)), "n4": str(rng.integers(1000, 10000)),
            "n5": str(rng.integers(10000, 100000)), "year": str(rng.integers(1900, 2021)),
            "time": f"{rng.integers(1, 13)}:{rng.integers(0, 60):02d}", "city": str(rng.choice(FACT_CITIES)),
            "word": str(rng.choice(FACT_WORDS)),
            "plate": "".join(rng.choice(list(letters), 3)) + "-" + str(rng.integers(100, 1000))}


def insert_sentence(doc: str, sentence: str, depth: float) -> str:
    """`sentence` put into `doc` at the first sentence or line end after `depth` of its characters."""
    at = int(len(doc) * depth)
    end = re.compile(r"[.!?]\s|\n").search(doc, at)
    cut = end.end() if end else len(doc)
    return f"{doc[:cut].rstrip()} {sentence} {doc[cut:].lstrip()}".strip()


def fact_chat(doc: str, rng: np.random.Generator, tokenizer) -> tuple[str, str]:
    """(training text, the answer's value): 1-3 facts about different people put into `doc` at depths 0.05-0.95,
    a question about one of them and the answer that states it, as a chat turn (or, for a tokenizer without a chat
    template, as "Question: ... Answer: ..." text)."""
    n = int(rng.integers(1, 4))
    names = rng.choice(FACT_NAMES, size=n, replace=False)
    kinds = rng.choice(len(FACTS), size=n, replace=False)
    depths = sorted(rng.uniform(0.05, 0.95, size=n))
    values = [_fact_values(rng) for _ in range(n)]
    for name, k, depth, v in reversed(list(zip(names, kinds, depths, values))):  # the deepest first
        doc = insert_sentence(doc, FACTS[k][0].format(name=name, **v), depth)
    t = int(rng.integers(n))
    question, answer, value = (part.format(name=names[t], **values[t]) for part in FACTS[kinds[t]][1:])
    if getattr(tokenizer, "chat_template", None):
        return chat_text(tokenizer, f"{doc}\n\n{question}", answer), value
    return f"{doc}\n\nQuestion: {question}\nAnswer: {answer}", value


def generate_fact_chats(tokenizer, out: str | Path, *, files: Sequence[str], count: int = 256,
                        lengths: Sequence[int] = FACT_LENGTHS, seed: int = 0,
                        progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write `count` fact chats as .jsonl shards under `out` (resumable, as generate_chat_data): a document of N
    tokens from `files` (use training-split files) with facts stated once in it, a question about one and its
    answer. The base writes nothing here: training distills its logits on these texts, answer included."""
    shards = []
    for k, n, path, docs in document_shards(Path(out), "facts", files=files, tokenizer=tokenizer, count=count,
                                            lengths=lengths, seed=seed):
        shards.append(path)
        if not path.is_file():
            rng = np.random.default_rng([seed, 7, k])
            lines = []
            for f, doc in docs:
                text, value = fact_chat(doc, rng, tokenizer)
                lines.append(json.dumps({"text": text, "answer": value, "source": f, "doc_tokens": n}))
            atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        if progress:
            progress(len(docs))
    return shards
