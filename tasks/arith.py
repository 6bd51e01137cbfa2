"""Two-digit addition and subtraction: the suite's built-in task, learnable by a tiny model on a CPU.

A problem reads ``47-13=`` and a correct response is `` #### 34`` followed by the EOS token, so the
GSM8K grader scores it unchanged. The problem space is finite (90 * 90 * 2 = 16,200 problems), so the
test set is a seeded random subset put aside and the training pool is every other problem.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from tasks import gsm8k
from tasks.base import Example, Task, register_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

OPERAND_MIN, OPERAND_MAX = 10, 99
OPS = ("+", "-")
N_PROBLEMS = (OPERAND_MAX - OPERAND_MIN + 1) ** 2 * len(OPS)
# Always at least this many problems are held out, so the training pool does not change with n_test.
MIN_HELD_OUT = 1000

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")
CHARACTERS = "0123456789+-=# "
# Ids are fixed here, not left to a trainer, so checkpoints stay readable by any later build.
VOCAB = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}


def make_example(a: int, op: str, b: int) -> Example:
    result = a + b if op == "+" else a - b
    return Example(uid=f"arith/{a}{op}{b}", question=f"{a}{op}{b}=", answer=f"#### {result}")


def all_problems() -> list[Example]:
    """Every distinct problem, in a fixed order."""
    operands = range(OPERAND_MIN, OPERAND_MAX + 1)
    return [make_example(a, op, b) for a in operands for op in OPS for b in operands]


def target_response(example: Example) -> str:
    """The correct response text, e.g. `` #### 34``; the policy should end it with the EOS token."""
    if not example.answer.startswith("#### "):
        raise ValueError(f"{example.uid}: answer {example.answer!r} is not in '#### N' form")
    return " " + example.answer


def target_ids(example: Example, tokenizer: Any) -> list[int]:
    """Token ids of the correct response, EOS included: what a supervised warm start trains on."""
    ids = tokenizer(target_response(example), add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``0123456789+-=# `` plus ``<pad>``, ``<eos>`` and ``<bos>``.

    Each character is one token, nothing is added on encoding, and decoding gives back the text exactly.
    Padding is on the left, as generation from a batch of prompts needs. A character outside the
    vocabulary makes encoding fail (there is no unknown token to hide it).
    """
    # Imported here so that looking tasks up by name does not pay for loading transformers.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


@register_task("arith")
class ArithTask(Task):
    """``seed`` picks the held-out problems and the order of both splits; ``n_test`` is the test size."""

    name = "arith"

    def __init__(self, seed: int = 0, n_test: int = 1000):
        for option, value in (("seed", seed), ("n_test", n_test)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"arith option {option!r} must be an int, got {value!r}")
        if not 1 <= n_test <= N_PROBLEMS // 2:
            raise ValueError(f"arith option 'n_test' must be in [1, {N_PROBLEMS // 2}], got {n_test}")
        self.seed, self.n_test = seed, n_test
        problems = all_problems()
        random.Random(seed).shuffle(problems)
        self._test = problems[:n_test]
        self._train = problems[max(n_test, MIN_HELD_OUT) :]

    def train(self) -> list[Example]:
        return list(self._train)

    def test(self) -> list[Example]:
        return list(self._test)

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        # Never a chat template: the tiny policy is trained from scratch on bare problems.
        return example.question

    def reward(self, response: str, answer: str) -> float:
        return gsm8k.reward(response, answer)

    @staticmethod
    def target_response(example: Example) -> str:
        return target_response(example)

    @staticmethod
    def tokenizer() -> PreTrainedTokenizerFast:
        return build_tokenizer()
