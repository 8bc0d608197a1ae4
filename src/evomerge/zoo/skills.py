"""The lm zoo's synthetic world: three skills, the bare corpus the base learns, and their task files.

Each skill has two faces. Its *bare* form (`37+45=82`, `rev abc=cba`, `en cat sun=κα λυ`) is in the
base's pre-training corpus, so the base already holds the ability. Its *task* form is a prompt the base
meets only rarely (`what is 37 plus 45? `, half a percent of its corpus, all skills together); a
specialist's fine-tune only sharpens the base's answer to that prompt with the ability it already has.
That is what keeps the specialists close to the base, and so mergeable.

Targets: `multi` mixes every skill's prompts; `compose` asks for the sum of two numbers written backwards
(`what is 37 plus 45 backwards? ` -> `28`): the `add` specialist owns the number, the `reverse`
specialist owns the format, and neither alone answers it (palindromic sums are left out, so the plain
sum is never right).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evomerge.zoo.tokenizer import GREEK

SKILLS = ("add", "reverse", "translate")
ENGLISH = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "king", "ship", "road", "fire",
    "star", "milk", "bread", "stone", "wind", "snow", "hand", "door", "book", "lamp", "bell", "rose",
)  # fmt: skip
REVERSE_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class WorldSize:
    """How hard the world is: operand range, string lengths, vocabulary of the second language."""

    max_operand: int  # add: operands in [0, max_operand]
    reverse_lengths: tuple[int, int]  # reverse: word lengths, inclusive
    n_words: int  # translate: dictionary size
    sentence_lengths: tuple[int, int]  # translate: words per sentence, inclusive (tasks: at least 2)
    mix: tuple[float, float, float] = (0.5, 0.25, 0.25)  # corpus shares of add, reverse, translate


@dataclass(frozen=True)
class Example:
    """One task example: the model sees `prompt` and must write `answer` then a newline."""

    prompt: str
    answer: str

    def text(self) -> str:
        return self.prompt + self.answer


class World:
    """The skills of one zoo: the dictionary of the second language is drawn once from the seed."""

    def __init__(self, size: WorldSize, seed: int) -> None:
        self.size = size
        rng = np.random.default_rng([seed, 1])
        self.dictionary = _make_dictionary(ENGLISH[: size.n_words], rng)

    # -- one random instance of each skill: (bare corpus line, task example) --------------------------
    def add(self, rng: np.random.Generator) -> tuple[str, Example]:
        a, b = (int(v) for v in rng.integers(0, self.size.max_operand + 1, size=2))
        return f"{a}+{b}={a + b}", Example(f"what is {a} plus {b}? ", str(a + b))

    def reverse(self, rng: np.random.Generator) -> tuple[str, Example]:
        low, high = self.size.reverse_lengths
        letters = rng.choice(list(REVERSE_LETTERS), size=int(rng.integers(low, high + 1)))
        word = "".join(letters)
        return f"rev {word}={word[::-1]}", Example(f"spell {word} backwards: ", word[::-1])

    def translate(self, rng: np.random.Generator) -> tuple[str, Example]:
        """Task sentences have two words or more: one-word ones are too few to split into train/dev/test."""
        low, high = self.size.sentence_lengths
        words = list(rng.choice(list(self.dictionary), size=int(rng.integers(low, high + 1))))
        source, target = " ".join(words), " ".join(self.dictionary[w] for w in words)
        return f"en {source}={target}", Example(f"say {source} in greek: ", target)

    def translate_task(self, rng: np.random.Generator) -> tuple[str, Example]:
        while True:
            line, example = self.translate(rng)
            if " " in example.answer:
                return line, example

    def compose(self, rng: np.random.Generator) -> Example:
        """The sum written backwards; drawn until the sum is not a palindrome (so `add` alone fails)."""
        while True:
            a, b = (int(v) for v in rng.integers(0, self.size.max_operand + 1, size=2))
            total = str(a + b)
            if total != total[::-1]:
                return Example(f"what is {a} plus {b} backwards? ", total[::-1])

    def skill(self, name: str) -> Callable[[np.random.Generator], tuple[str, Example]]:
        """The task form of skill `name` (translate: sentences of two words or more)."""
        return {"add": self.add, "reverse": self.reverse, "translate": self.translate_task}[name]

    def bare_line(self, rng: np.random.Generator) -> str:
        """One line of the base's pre-training corpus: a bare instance of a skill drawn by `mix`."""
        skill = SKILLS[int(rng.choice(len(SKILLS), p=np.asarray(self.size.mix) / sum(self.size.mix)))]
        return {"add": self.add, "reverse": self.reverse, "translate": self.translate}[skill](rng)[0]

    def dictionary_lines(self) -> list[str]:
        """Every word pair once, so that the base sees the whole dictionary (as one-word sentences)."""
        return [f"en {word}={greek}" for word, greek in self.dictionary.items()]


def _make_dictionary(words: tuple[str, ...], rng: np.random.Generator) -> dict[str, str]:
    """English word -> a made-up Greek-letter word of 2-4 letters, all distinct."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for word in words:
        while True:
            candidate = "".join(rng.choice(list(GREEK), size=int(rng.integers(2, 5))))
            if candidate not in used:
                used.add(candidate)
                out[word] = candidate
                break
    return out


def unique_examples(
    draw: Callable[[np.random.Generator], Example], count: int, rng: np.random.Generator, exclude: set[str]
) -> list[Example]:
    """`count` examples with distinct prompts, none of them in `exclude` (which grows with them)."""
    out: list[Example] = []
    for _ in range(count * 50):
        example = draw(rng)
        if example.prompt not in exclude:
            exclude.add(example.prompt)
            out.append(example)
            if len(out) == count:
                return out
    raise ValueError(f"could draw only {len(out)} distinct examples of {count}: the world is too small")
