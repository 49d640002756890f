"""Synthetic long-context tasks, generated locally and deterministically.

Used by the tests, the demo and ``benchmarks/quality.py``.  Lengths are in
tokens of the given tokenizer (anything with ``encode(text) -> list``).

* ``passkey``      a 5-digit key hidden at a given depth in repetitive filler.
* ``multikey``     several labelled keys in filler; the question names one.
* ``digit_repeat`` repeat a long random digit string (KV-Compress's sanity
                   test: every generated digit needs its KV to survive).

The robust suite (``robust_suite``; ``benchmarks/quality.py --suite robust``)
adds natural-prose haystacks from a local generator (``prose``: sentences
composed from templates and word lists, no digits, no downloads):

* ``prose_needle`` one labelled key ("the pass key of the museum is ...").
* ``prose_multi``  three labelled keys; the question names one.
* ``filler_multi`` three labelled keys in ``FILLER`` at random depths.
* ``prose_copy``   a 48-digit string inside prose, to be repeated at the end.
* ``filler_needle`` is ``passkey`` at a seeded random depth.

The long-generation suite (``LONG_CASES``; ``quality.py --suite long``)
continues a prompt for 512 tokens, so a request is re-compressed several times
while it decodes; the caller scores each continuation against the
uncompressed one (``word_recall`` and the agreeing prefix):

* ``filler_continue`` a ``filler_needle`` (passkey) prompt, continued.
* ``prose_continue``  a ``prose_needle`` prompt, continued.

(A third case, reciting a labelled 256-token prose passage, was dropped: the
default model reproduced 8-19% of its words uncompressed.)

Every case is a pure function of (tokenizer, length, seed); the held-in /
held-out split is by seed parity (``split_of``: even = held-in).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

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
        if self.kind in ("digit_repeat", "prose_copy"):
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


# --- natural prose (robust suite) ------------------------------------------------
#
# A deterministic, download-free prose generator: sentences composed from
# varied templates and word lists, so that the haystack is non-repetitive
# natural text (unlike ``FILLER``).  It contains no digits, so the needles'
# numbers are the only ones in a prompt.

_PEOPLE = (
    "the old miller", "a young teacher", "the harbour master", "my grandmother", "the baker's son",
    "a travelling musician", "the village doctor", "two fishermen", "the mayor", "a quiet student",
    "the innkeeper", "our neighbour", "the blacksmith", "a tired soldier", "the gardener",
    "an elderly poet", "the shepherd", "a curious child", "the ferryman", "the librarian",
)
_VERBS = (
    "carried", "painted", "repaired", "sold", "borrowed", "described", "found", "lost",
    "admired", "cleaned", "measured", "wrapped", "hid", "examined", "returned", "ordered",
)
_THINGS = (
    "a basket of apples", "the broken lantern", "an old map", "a wooden chair", "the blue coat",
    "a letter from the city", "a pair of boots", "the copper kettle", "a bundle of firewood",
    "the silver bell", "a jar of honey", "a heavy book", "the torn sail", "a clay pot",
    "the iron gate", "a box of candles", "a woollen scarf", "the painted sign",
)
_PLACES = (
    "near the river", "at the market", "behind the church", "on the hill", "in the kitchen",
    "by the harbour", "under the bridge", "in the orchard", "at the station", "in the square",
    "along the canal", "beside the mill", "at the edge of the forest", "in the attic",
)
_TIMES = (
    "In the early morning", "Late in the evening", "During the long winter", "Before the storm",
    "On a quiet Sunday", "After the harvest", "At noon", "In the middle of spring",
    "When the rain stopped", "Just before dinner", "On the first warm day", "Every autumn",
)
_ADJS = (
    "bright", "cold", "noisy", "peaceful", "crowded", "dusty", "gentle", "strange", "warm",
    "grey", "busy", "narrow", "windy", "pleasant", "ordinary", "lonely",
)
_NOUNS = (
    "street", "valley", "morning", "road", "garden", "town", "meadow", "shop", "afternoon",
    "coast", "house", "field", "village", "path",
)
_FEELINGS = (
    "pleased", "surprised", "worried", "amused", "tired", "proud", "curious", "relieved",
)
_TEMPLATES = (
    "{Time}, {person} {verb} {thing} {place}.",
    "{Person} {verb} {thing} {place}, and nobody asked why.",
    "It was a {adj} {noun}, and {person} {verb} {thing}.",
    "{Person} was {feeling} to see {thing} {place}.",
    "{Time}, the {noun} was {adj} and {person} walked slowly {place}.",
    "Some said that {person} had {verb} {thing} long ago.",
    "{Person} told {person2} about {thing} {place}.",
    "The {noun} felt {adj}, so {person} stayed {place} for a while.",
    "{Time}, {person} and {person2} talked about the {adj} {noun}.",
    "Nobody remembered who had {verb} {thing}, but {person} was {feeling}.",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def prose_sentence(rng: random.Random) -> str:
    """One sentence of generated prose (no digits)."""
    person, person2 = rng.sample(_PEOPLE, 2)
    return rng.choice(_TEMPLATES).format(
        Time=rng.choice(_TIMES), person=person, Person=_cap(person), person2=person2,
        verb=rng.choice(_VERBS), thing=rng.choice(_THINGS), place=rng.choice(_PLACES),
        adj=rng.choice(_ADJS), noun=rng.choice(_NOUNS), feeling=rng.choice(_FEELINGS),
    )


def prose(tokenizer, budget: int, rng: random.Random) -> str:
    """Generated prose of at most about ``budget`` tokens (paragraphs of 4-7
    sentences), drawn from ``rng``."""
    out: list[str] = []
    used = 0
    while True:
        paragraph = " ".join(prose_sentence(rng) for _ in range(rng.randint(4, 7))) + "\n"
        cost = _count(tokenizer, paragraph)
        if used + cost > budget:
            # Finish with single sentences up to the budget.
            while True:
                sentence = prose_sentence(rng) + " "
                cost = _count(tokenizer, sentence)
                if used + cost > budget:
                    return "".join(out)
                out.append(sentence)
                used += cost
        out.append(paragraph)
        used += cost


#: Labels of the prose needles ("the pass key of the lighthouse is ...").
PLACES = ("lighthouse", "bakery", "museum", "harbour", "library", "observatory", "chapel", "tannery")


def _haystack(tokenizer, num_tokens: int, needles: list[str], question: str,
              rng: random.Random, filler: bool) -> tuple[str, list[float]]:
    """``needles`` at random depths of a haystack (prose or ``FILLER``) of
    about ``num_tokens`` tokens in all, then ``question``.  Returns the prompt
    and each needle's depth (in the order given)."""
    budget = num_tokens - _count(tokenizer, "".join(needles) + question)
    depths = sorted(rng.uniform(0.05, 0.9) for _ in needles)
    order = list(range(len(needles)))
    rng.shuffle(order)  # which needle goes at which depth
    parts, used = [], 0
    for slot, depth in enumerate(depths):
        chunk = max(0, int(budget * depth) - used)
        text = _fill(tokenizer, chunk) if filler else prose(tokenizer, chunk, rng)
        used += _count(tokenizer, text)
        parts += [text, needles[order[slot]]]
    tail = max(0, budget - used)
    parts.append(_fill(tokenizer, tail) if filler else prose(tokenizer, tail, rng))
    where = [depths[order.index(i)] for i in range(len(needles))]
    return "".join(parts) + question, where


def prose_needle(tokenizer, num_tokens: int, seed: int) -> Task:
    """One labelled 5-digit key at a random depth of generated prose."""
    rng = random.Random(seed)
    place = rng.choice(PLACES)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key of the {place} is {key}. "
    question = f"\nWhat is the pass key of the {place}? The pass key of the {place} is"
    prompt, (depth,) = _haystack(tokenizer, num_tokens, [needle], question, rng, filler=False)
    return Task("prose_needle", prompt, key, _count(tokenizer, prompt), depth)


def _labelled_keys(tokenizer, num_tokens: int, seed: int, num_keys: int, *, kind: str,
                   labels, needle: str, question: str, filler: bool) -> Task:
    """``num_keys`` labelled keys at random depths of a haystack; the question
    names one of them.  ``needle``/``question`` are formats of ``label`` (and
    ``key``)."""
    rng = random.Random(seed)
    chosen = rng.sample(labels, num_keys)
    keys = {label: str(rng.randint(10000, 99999)) for label in chosen}
    target = rng.choice(chosen)
    needles = [needle.format(label=label, key=keys[label]) for label in chosen]
    prompt, depths = _haystack(tokenizer, num_tokens, needles, question.format(label=target),
                               rng, filler=filler)
    return Task(kind, prompt, keys[target], _count(tokenizer, prompt), depths[chosen.index(target)])


def prose_multi(tokenizer, num_tokens: int, seed: int, num_keys: int = 3) -> Task:
    """``num_keys`` labelled keys at random depths of generated prose; the
    question names one of them."""
    return _labelled_keys(
        tokenizer, num_tokens, seed, num_keys, kind="prose_multi", labels=PLACES,
        needle=" The pass key of the {label} is {key}. ",
        question="\nWhat is the pass key of the {label}? The pass key of the {label} is",
        filler=False,
    )


def filler_multi(tokenizer, num_tokens: int, seed: int, num_keys: int = 3) -> Task:
    """``num_keys`` labelled keys at random depths of repetitive filler; the
    question names one (as ``multikey``, with random depths)."""
    return _labelled_keys(
        tokenizer, num_tokens, seed, num_keys, kind="filler_multi", labels=NAMES,
        needle=" The {label} pass key is {key}. ",
        question=" What is the {label} pass key? The {label} pass key is",
        filler=True,
    )


def prose_copy(tokenizer, num_tokens: int, seed: int, num_digits: int = 48) -> Task:
    """Copy task in context: a random digit string in the middle of generated
    prose, and at the end the request to repeat it (the first 4 digits given).
    Scored by the fraction of the remaining digits reproduced in place."""
    rng = random.Random(seed)
    digits = "".join(str(rng.randint(0, 9)) for _ in range(num_digits))
    head = 4
    needle = f"\nHere is a string of digits to remember: {digits}\n"
    question = f"\nRepeat the string of digits from above exactly: {digits[:head]}"
    prompt, (depth,) = _haystack(tokenizer, num_tokens, [needle], question, rng, filler=False)
    return Task("prose_copy", prompt, digits[head:], _count(tokenizer, prompt), depth)


def word_recall(reference: str, completion: str) -> float:
    """Fraction of the reference's words reproduced in order: the words in
    difflib's matching blocks of the two word sequences (a greedy alignment,
    close to but not always the longest common subsequence) over the
    reference's length.  One slipped word costs one word, not the rest.  An
    empty reference is reproduced only by an empty completion."""
    from difflib import SequenceMatcher

    ref, got = reference.lower().split(), completion.lower().split()
    if not ref:
        return 0.0 if got else 1.0
    blocks = SequenceMatcher(None, ref, got, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks) / len(ref)


def as_continuation(task: Task) -> Task:
    """``task``'s prompt, to be continued well past its answer (kind
    ``continue``: scored by the caller against the uncompressed continuation)."""
    return replace(task, kind="continue")


#: The robust suite's cases: name -> ``f(tokenizer, num_tokens, seed) -> Task``.
ROBUST_CASES = {
    "filler_needle": lambda tok, n, seed: passkey(
        tok, n, depth=random.Random(seed).uniform(0.05, 0.9), seed=seed),
    "filler_multi": filler_multi,
    "prose_needle": prose_needle,
    "prose_multi": prose_multi,
    "prose_copy": prose_copy,
}
ROBUST_LENGTHS = (1500, 3500)
#: The long-generation suite's cases (same contract as ``ROBUST_CASES``).
LONG_CASES = {
    "filler_continue": lambda tok, n, seed: as_continuation(ROBUST_CASES["filler_needle"](tok, n, seed)),
    "prose_continue": lambda tok, n, seed: as_continuation(ROBUST_CASES["prose_needle"](tok, n, seed)),
}


def split_of(seed: int) -> str:
    """Held-in/held-out split of a generated case: by its seed's parity
    (even = ``held-in``, used to choose; odd = ``held-out``, only reported)."""
    return "held-in" if seed % 2 == 0 else "held-out"


def robust_suite(tokenizer, n: int, split: str, lengths=ROBUST_LENGTHS, cases=None,
                 registry=None) -> list[tuple[str, int, int, Task]]:
    """``(case, length, seed, task)`` for the first ``n`` seeds of ``split``
    (``held-in``: seeds 0, 2, 4, ...; ``held-out``: 1, 3, 5, ...; ``all``:
    0, 1, 2, ...) in every case x length cell of ``registry`` (default
    ``ROBUST_CASES``; ``LONG_CASES`` for the long-generation suite).  Seed
    offset ``s`` of a cell becomes ``100_000 * (length_index + 1) + 1000 *
    case_index + s``, so the parity of ``s`` decides the split."""
    registry = ROBUST_CASES if registry is None else registry
    names = list(cases or registry)
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ValueError(f"cases {unknown} are not in this suite (known: {', '.join(registry)})")
    if split == "held-in":
        seeds = [2 * i for i in range(n)]
    elif split == "held-out":
        seeds = [2 * i + 1 for i in range(n)]
    elif split == "all":
        seeds = list(range(n))
    else:
        raise ValueError(f"split must be held-in, held-out or all; got {split!r}")
    out = []
    for li, length in enumerate(lengths):
        for ci, name in enumerate(names):
            case_index = list(registry).index(name)
            for s in seeds:
                seed = 100_000 * (li + 1) + 1000 * case_index + s
                task = registry[name](tokenizer, length, seed)
                out.append((name, length, seed, task))
    return out
