"""Synthetic long-context tasks, generated locally and deterministically.

Used by the tests, the demo and ``benchmarks/quality.py``.  Lengths are in
tokens of the given tokenizer (anything with ``encode(text) -> list``).

* ``passkey``      a 5-digit key hidden at a given depth in repetitive filler.
* ``multikey``     several labelled keys in filler; the question names one.
* ``digit_repeat`` repeat a long random digit string (KV-Compress's sanity
                   test: every generated digit needs its KV to survive).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again. "
)
NAMES = ("red", "blue", "green", "orange", "purple", "silver", "golden", "black")


@dataclass(frozen=True)
class Task:
    kind: str
    prompt: str
    answer: str
    num_tokens: int
    depth: float = 0.0

    def score(self, completion: str) -> float:
        """1.0 if the answer is produced (digit tasks: fraction of digits)."""
        if self.kind == "digit_repeat":
            got = "".join(ch for ch in completion if ch.isdigit())
            hits = sum(a == b for a, b in zip(self.answer, got))
            return hits / len(self.answer)
        return 1.0 if self.answer in completion else 0.0


def _fill(tokenizer, budget: int) -> str:
    """Repeated filler of about ``budget`` tokens."""
    unit = len(tokenizer.encode(FILLER))
    return FILLER * max(0, budget // max(unit, 1))


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def passkey(tokenizer, num_tokens: int, depth: float, seed: int) -> Task:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    budget = num_tokens - _count(tokenizer, needle + question)
    before = _fill(tokenizer, int(budget * depth))
    after = _fill(tokenizer, budget - _count(tokenizer, before))
    prompt = before + needle + after + question
    return Task("passkey", prompt, key, _count(tokenizer, prompt), depth)


def multikey(tokenizer, num_tokens: int, num_keys: int, seed: int) -> Task:
    rng = random.Random(seed)
    names = rng.sample(NAMES, num_keys)
    keys = {name: str(rng.randint(10000, 99999)) for name in names}
    target = rng.choice(names)
    needles = [f" The {name} pass key is {keys[name]}. " for name in names]
    question = f" What is the {target} pass key? The {target} pass key is"
    budget = num_tokens - _count(tokenizer, "".join(needles) + question)
    chunk = max(0, budget // (num_keys + 1))
    parts = []
    for needle in needles:
        parts += [_fill(tokenizer, chunk), needle]
    parts.append(_fill(tokenizer, budget - chunk * num_keys))
    prompt = "".join(parts) + question
    depth = names.index(target) / num_keys
    return Task("multikey", prompt, keys[target], _count(tokenizer, prompt), depth)


def digit_repeat(tokenizer, num_digits: int, seed: int) -> Task:
    rng = random.Random(seed)
    digits = "".join(str(rng.randint(0, 9)) for _ in range(num_digits))
    head = 10
    prompt = (
        f"Repeat the following string of digits:\n{digits}\n"
        f"Here is the string again:\n{digits[:head]}"
    )
    return Task("digit_repeat", prompt, digits[head:], _count(tokenizer, prompt))
