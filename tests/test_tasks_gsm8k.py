"""GSM8K task: the shipped data, the loader's errors, the prompt, and the grader on real and hand-made cases."""

from __future__ import annotations

import json

import pytest

from tasks import TASKS, DataError, Example, UnknownNameError, get_task
from tasks.gsm8k import (
    DATA_DIR,
    GSM8KTask,
    extract_answer,
    load_jsonl,
    parse_number,
    reference_value,
    reward,
)


@pytest.fixture(scope="module")
def task() -> GSM8KTask:
    return get_task("gsm8k")


@pytest.fixture(scope="module")
def all_examples(task: GSM8KTask) -> list[Example]:
    return task.train() + task.test()


# --- the shipped data -------------------------------------------------------------------------------


def test_shipped_copy_is_complete(task: GSM8KTask) -> None:
    assert (DATA_DIR / "LICENSE").read_text().startswith("MIT License")
    assert "OpenAI" in (DATA_DIR / "README.md").read_text()
    train, test = task.train(), task.test()
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].uid == "gsm8k/train/0" and test[-1].uid == "gsm8k/test/1318"
    assert len({e.uid for e in train + test}) == len(train) + len(test)
    assert test[0].question.startswith("Janet")
    assert test[0].answer.endswith("#### 18")


def test_splits_are_copies(task: GSM8KTask) -> None:
    task.test().clear()
    assert len(task.test()) == 1319


def test_every_real_solution_earns_full_reward(all_examples: list[Example]) -> None:
    for strict in (False, True):
        failures = [e.uid for e in all_examples if reward(e.answer, e.answer, strict=strict) != 1.0]
        assert failures == [], f"strict={strict}"


def test_solution_against_another_questions_answer(all_examples: list[Example]) -> None:
    """Labelled check: a real solution graded against its neighbour's answer is right iff the numbers match."""
    differing = 0
    for solution, other in zip(all_examples, all_examples[1:]):
        same = reference_value(solution.answer) == reference_value(other.answer)
        differing += not same
        assert reward(solution.answer, other.answer) == float(same), (solution.uid, other.uid)
    assert differing > 0.9 * len(all_examples)  # the check is not vacuous


# --- the grader -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("The total is 1,000 apples.\n#### 1,000", "1000", 1.0),
        ("#### 1000", "#### 1,000", 1.0),
        ("#### 109,200,000", "109200000", 1.0),
        ("#### $18", "#### 18", 1.0),
        ("#### 18.", "18", 1.0),
        ("#### 42.0", "#### 42", 1.0),
        ("#### 2.50", "2.5", 1.0),
        ("#### 2.6", "2.5", 0.0),
        ("#### -5", "-5", 1.0),
        ("#### −5", "-5", 1.0),
        ("#### 5", "-5", 0.0),
        ("#### -$5", "-5", 1.0),
        ("#### 50%", "50", 1.0),
        ("#### 0.3333333", "1/3", 1.0),
        ("#### 0.333", "1/3", 0.0),
        ("so the box holds $\\boxed{72}$", "72", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{1,200}", "1200", 1.0),
        ("\\boxed{18 \\text{ dollars}}", "18", 1.0),
        ("The answer is 18.", "18", 1.0),
        ("the final answer is: $18", "18", 1.0),
        ("Q: how many? A: 7", "7", 1.0),
        ("She had 3 apples and bought 4 more, so 7 apples.", "7", 1.0),
        ("3 + 4 = 7, and then 9 more", "7", 0.0),
        ("10-3", "3", 1.0),
        ("The answer is 5, from 2 + 3.", "5", 1.0),
        ("The answer is 5. On reflection \\boxed{6}", "6", 1.0),
        ("\\boxed{6}. No: the answer is 5", "5", 1.0),
        ("A: 4, but the answer is 9", "9", 1.0),
        ("#### 3, no wait #### 4", "4", 1.0),
        ("#### 3, no wait #### 4", "3", 0.0),
        ("The answer is 7 ####", "7", 1.0),
        ("I do not know.", "5", 0.0),
        ("####", "5", 0.0),
        ("", "5", 0.0),
    ],
)
def test_reward_edge_cases(response: str, answer: str, expected: float) -> None:
    assert reward(response, answer) == expected


@pytest.mark.parametrize(
    "response",
    ["The answer is 18", "\\boxed{18}", "A: 18", "so 18", "The answer is 18 ####"],
)
def test_strict_accepts_only_hashes(response: str) -> None:
    assert reward(response, "18") == 1.0
    assert reward(response, "18", strict=True) == 0.0
    assert reward(response + "\n#### 18", "18", strict=True) == 1.0


def test_strict_option_of_the_task() -> None:
    assert get_task("gsm8k", strict=True).reward("The answer is 18", "#### 18") == 0.0
    assert get_task("gsm8k").reward("The answer is 18", "#### 18") == 1.0


def test_reference_without_a_number_is_an_error() -> None:
    with pytest.raises(ValueError, match="reference answer has no final number"):
        reward("#### 5", "no idea")
    with pytest.raises(ValueError, match="reference answer has no final number"):
        reward("#### 5", "it is #### unknown")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,000", 1000.0),
        (" $5 ", 5.0),
        ("-$5", -5.0),
        ("$-5", -5.0),
        ("42.", 42.0),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{8}", 0.125),
        ("1{,}000", 1000.0),
        ("abc", None),
        ("5/0", None),
        ("", None),
        ("1 2", None),
        ("--5", None),
        ("1,00", None),
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


def test_extract_answer_returns_the_answer_text() -> None:
    assert extract_answer("x\n#### $1,080.") == "$1,080"
    assert extract_answer("The answer is -7.") == "-7"
    assert extract_answer("no digits here") is None
    assert extract_answer("The answer is 18", strict=True) is None
    assert extract_answer("\\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"


# --- the loader -------------------------------------------------------------------------------------


def _write(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


GOOD = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        (json.dumps({"question": "q"}), "missing key 'answer'"),
        (json.dumps({"answer": "#### 1"}), "missing key 'question'"),
        (json.dumps({"question": 3, "answer": "#### 1"}), "'question' must be a string, got int"),
        (json.dumps({"question": "q", "answer": 4}), "'answer' must be a string, got int"),
        (json.dumps(["q", "#### 1"]), "expected a JSON object"),
        (json.dumps({"question": " ", "answer": "#### 1"}), "'question' is empty"),
        (json.dumps({"question": "q", "answer": "#### none"}), "'answer' has no final number"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, bad_line: str, problem: str) -> None:
    path = tmp_path / "broken.jsonl"
    _write(path, [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert f"broken.jsonl:3: {problem}" in str(info.value)


def test_missing_and_empty_files(tmp_path) -> None:
    with pytest.raises(DataError, match="nowhere.jsonl: no such file"):
        load_jsonl(tmp_path / "nowhere.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_loader_accepts_bare_numbers_and_blank_lines(tmp_path) -> None:
    path = tmp_path / "mine.jsonl"
    _write(path, [GOOD, "", json.dumps({"question": "Half of 3?", "answer": "1.5"})])
    examples = load_jsonl(path, uid_prefix="x")
    assert examples == [
        Example("x/0", "What is 1+1?", "1+1=2\n#### 2"),
        Example("x/1", "Half of 3?", "1.5"),
    ]
    assert load_jsonl(path)[1].uid == "mine/1"


def test_task_data_dir_option(tmp_path) -> None:
    _write(tmp_path / "train.jsonl", [GOOD])
    _write(tmp_path / "test.jsonl", [GOOD, GOOD])
    task = get_task("gsm8k", data_dir=str(tmp_path))
    assert [e.uid for e in task.test()] == ["gsm8k/test/0", "gsm8k/test/1"]
    assert len(task.train()) == 1
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(DataError, match="test.jsonl: no such file"):
        get_task("gsm8k", data_dir=tmp_path).test()
    with pytest.raises(DataError, match="does not exist"):
        get_task("gsm8k", data_dir=tmp_path / "absent")


# --- the registry and the prompt --------------------------------------------------------------------


def test_registry_lookup_errors() -> None:
    assert {"arith", "gsm8k"} <= set(TASKS.names())
    assert all(TASKS.get(name).name == name for name in TASKS.names())
    with pytest.raises(UnknownNameError, match="unknown task 'gsm9k'; valid names: .*arith.*gsm8k"):
        get_task("gsm9k")
    with pytest.raises(TypeError, match="task 'gsm8k' has no option.* seed; valid options: data_dir, strict"):
        get_task("gsm8k", seed=1)
    with pytest.raises(TypeError, match="'strict' must be a bool"):
        get_task("gsm8k", strict="yes")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


EXPECTED_TEXT = 'How many? Let\'s think step by step and output the final answer after "####".'


def test_prompt_without_chat_template(task: GSM8KTask) -> None:
    example = Example("u", "How many?", "#### 3")
    assert task.prompt(example) == EXPECTED_TEXT
    assert task.prompt(example, _tiny_tokenizer()) == EXPECTED_TEXT


def test_prompt_with_chat_template(task: GSM8KTask) -> None:
    tokenizer = _tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompt = task.prompt(Example("u", "How many?", "#### 3"), tokenizer)
    assert prompt == f"<|user|>{EXPECTED_TEXT}\n<|assistant|>"
