"""What every task offers the trainer: examples, the prompt the policy sees, and a scalar reward."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from algorithms.registry import Registry


class DataError(ValueError):
    """Bad task data; the message names the file (and the line, for a bad row)."""


@dataclass(frozen=True)
class Example:
    """One problem of a task."""

    # Identifier that is stable across runs and unique within the task (e.g. "gsm8k/test/17").
    uid: str
    # The problem as the task states it, before any prompt wording or chat template is added.
    question: str
    # Reference text the grader compares against: a full GSM8K solution ending in "#### N", or a bare number.
    answer: str


def render_prompt(text: str, tokenizer: Any = None) -> str:
    """``text`` as a single user turn of the tokenizer's chat template, or unchanged when there is none.

    The generation prompt is added so that the policy's continuation is the assistant's reply.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text


class Task(ABC):
    """A source of problems with a verifiable reward.

    Subclasses set ``name`` to the name they are registered under and take their options as keyword
    arguments of ``__init__``.
    """

    name: ClassVar[str]

    @abstractmethod
    def train(self) -> list[Example]:
        """The training pool, in a fixed order."""

    @abstractmethod
    def test(self) -> list[Example]:
        """The held-out evaluation set, in a fixed order."""

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        """The text the policy sees for ``example``."""
        return render_prompt(example.question, tokenizer)

    @abstractmethod
    def reward(self, response: str, answer: str) -> float:
        """Score of the policy's ``response`` against the reference ``answer`` (an ``Example.answer``)."""


# Task classes, keyed by name; ``tasks.get_task`` builds one from its name and options.
TASKS: Registry[type[Task]] = Registry("task")
register_task = TASKS.register
