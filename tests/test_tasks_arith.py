"""Arithmetic task: deterministic disjoint splits, correct references, and the character-level tokenizer."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from tasks import Example, get_task
from tasks.arith import (
    MIN_HELD_OUT,
    N_PROBLEMS,
    VOCAB,
    ArithTask,
    build_tokenizer,
    make_example,
    target_ids,
    target_response,
)
from tasks.gsm8k import reference_value, reward

PROBLEM_RE = re.compile(r"(\d\d)([+-])(\d\d)=")


@pytest.fixture(scope="module")
def task() -> ArithTask:
    return get_task("arith")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_splits_are_deterministic(task: ArithTask) -> None:
    again = ArithTask(seed=0)
    assert task.train() == again.train() and task.test() == again.test()
    other = ArithTask(seed=1)
    assert other.test() != task.test()
    assert {e.uid for e in other.train()} != {e.uid for e in task.train()}


def test_splits_are_disjoint_and_cover_the_problem_space(task: ArithTask) -> None:
    train, test = task.train(), task.test()
    assert len(test) == 1000 and len({e.uid for e in test}) == 1000
    assert len(train) == N_PROBLEMS - 1000 and len({e.uid for e in train}) == len(train)
    assert not {e.question for e in train} & {e.question for e in test}
    assert N_PROBLEMS == 90 * 90 * 2


def test_train_is_shuffled(task: ArithTask) -> None:
    questions = [e.question for e in task.train()[:50]]
    assert questions != sorted(questions)
    assert {q[2] for q in questions} == {"+", "-"}  # the operator sits at index 2 of "47-13="


def test_n_test_option() -> None:
    small, large = ArithTask(n_test=200), ArithTask(n_test=2000)
    assert len(small.test()) == 200 and len(large.test()) == 2000
    # The first MIN_HELD_OUT shuffled problems are always held out, so the pool ignores smaller n_test.
    assert small.train() == ArithTask().train()
    assert small.test() == ArithTask().test()[:200]
    assert len(large.train()) == N_PROBLEMS - 2000
    assert not {e.uid for e in large.train()} & {e.uid for e in large.test()}
    assert MIN_HELD_OUT == 1000


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"n_test": 0}, ValueError, "'n_test' must be in"),
        ({"n_test": N_PROBLEMS}, ValueError, "'n_test' must be in"),
        ({"seed": "0"}, TypeError, "'seed' must be an int"),
        ({"n_test": True}, TypeError, "'n_test' must be an int"),
        ({"size": 3}, TypeError, "has no option.* size; valid options: seed, n_test"),
    ],
)
def test_bad_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        get_task("arith", **options)


def test_every_reference_is_the_true_result(task: ArithTask) -> None:
    ops_seen = set()
    for example in task.train() + task.test():
        a, op, b = PROBLEM_RE.fullmatch(example.question).groups()
        a, b = int(a), int(b)
        assert 10 <= a <= 99 and 10 <= b <= 99
        truth = a + b if op == "+" else a - b
        assert reference_value(example.answer) == truth
        assert example.answer == f"#### {truth}"
        assert example.uid == f"arith/{example.question[:-1]}"
        ops_seen.add(op)
    assert ops_seen == {"+", "-"}


def test_target_response_is_graded_correct(task: ArithTask) -> None:
    for example in task.test():
        response = target_response(example)
        assert response == " " + example.answer and response.startswith(" #### ")
        assert task.reward(response, example.answer) == 1.0
        assert reward(response, example.answer, strict=True) == 1.0
        wrong = f" #### {reference_value(example.answer) + 1:g}"
        assert task.reward(wrong, example.answer) == 0.0
    assert ArithTask.target_response(make_example(13, "-", 47)) == " #### -34"
    with pytest.raises(ValueError, match="not in '#### N' form"):
        target_response(Example("u", "11+11=", "22"))


def test_prompt_is_the_bare_problem(task: ArithTask, tokenizer) -> None:
    example = make_example(47, "-", 13)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<|assistant|>"
    try:
        assert task.prompt(example) == task.prompt(example, tokenizer) == "47-13="
    finally:
        tokenizer.chat_template = None


def test_tokenizer_ids_are_fixed(tokenizer) -> None:
    assert VOCAB == {
        "<pad>": 0, "<eos>": 1, "<bos>": 2,
        "0": 3, "1": 4, "2": 5, "3": 6, "4": 7, "5": 8, "6": 9, "7": 10, "8": 11, "9": 12,
        "+": 13, "-": 14, "=": 15, "#": 16, " ": 17,
    }  # fmt: skip
    assert tokenizer.get_vocab() == VOCAB and len(tokenizer) == 18
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert tokenizer("47-13= #### 34")["input_ids"] == [7, 10, 14, 4, 6, 15, 17, 16, 16, 16, 16, 17, 6, 7]
    assert ArithTask.tokenizer().get_vocab() == VOCAB


def test_tokenizer_round_trip(task: ArithTask, tokenizer) -> None:
    for example in task.test():
        text = task.prompt(example) + target_response(example)
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tokenizer.decode(ids) == text
    ids = target_ids(make_example(47, "-", 13), tokenizer)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == " #### 34<eos>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == " #### 34"


def test_tokenizer_pads_on_the_left(tokenizer) -> None:
    batch = tokenizer(["47-13=", "1+1="], padding=True)
    assert batch["input_ids"][1] == [0, 0, 4, 13, 4, 15]
    assert batch["attention_mask"][1] == [0, 0, 1, 1, 1, 1]


def test_tokenizer_rejects_unknown_characters(tokenizer) -> None:
    with pytest.raises(Exception, match="Missing"):
        tokenizer("47*13=")


def test_tokenizer_save_and_load(tmp_path, tokenizer) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "98+76= #### 174"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.get_vocab() == VOCAB
    assert loaded.padding_side == "left"
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2)
