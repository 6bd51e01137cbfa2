"""GSM8K grade-school maths: the shipped data, its loader, the prompt, and the numeric grader.

The grader is shared by every task whose answers are numbers (the arithmetic task uses it too), so it is
lenient by default about how a policy writes its final answer; ``strict=True`` accepts only "#### N".
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.base import DataError, Example, Task, register_task, render_prompt

DATA_DIR = Path(__file__).parent / "data" / "gsm8k"
INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
TOLERANCE = 1e-6

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # 1,000 is one number; 1,2 is two
# A minus right after an operand ("10-3") is subtraction, not a sign, so a sign may not follow one.
_NUMBER = rf"(?:(?<![\w)\]}}.])[-−])?(?:\$\s?)?(?:(?<=\$)[-−])?{_DIGITS}(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(rf"the (?:final )?answer is\s*:?\s*(?P<num>{_NUMBER})", re.IGNORECASE)
_A_COLON_RE = re.compile(rf"(?<![A-Za-z])A:\s*(?P<num>{_NUMBER})")
_BOXED_RE = re.compile(r"\\boxed\s*\{")
_FULL_NUMBER_RE = re.compile(
    rf"(?P<neg>[-−])?\$?\s?(?P<neg2>[-−])?(?P<num>{_DIGITS})(?:/(?P<den>{_DIGITS}))?"
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def parse_number(s: str) -> float | None:
    """The value of ``s`` when the whole of it is one number, else None.

    Accepts thousands commas, a leading ``$``, a sign, decimals, a trailing period or percent sign, simple
    fractions ``a/b`` and LaTeX ``\\frac{a}{b}``.
    """
    s = s.strip().replace("\\$", "$").replace("{,}", ",").replace("\\!", "")
    s = _LATEX_FRAC_RE.sub(r"\1/\2", s).rstrip(".%").strip()
    m = _FULL_NUMBER_RE.fullmatch(s)
    if m is None or (m["neg"] and m["neg2"]):
        return None
    value = float(m["num"].replace(",", ""))
    if m["den"] is not None:
        den = float(m["den"].replace(",", ""))
        if den == 0:
            return None
        value /= den
    return -value if m["neg"] or m["neg2"] else value


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, content) of each ``\\boxed{...}``, braces inside the box balanced."""
    found = []
    for m in _BOXED_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final-answer text of a response, or None when there is none.

    The number after the last "####"; failing that (and unless ``strict``), whichever of "The answer is X",
    "A: X" and ``\\boxed{X}`` comes last; failing that, the last number in the text.
    """
    if "####" in text:
        m = _NUMBER_RE.search(text.rsplit("####", 1)[1])
        if m is not None:
            return m.group().strip()
    if strict:
        return None
    candidates = [(m.start(), m["num"]) for m in _ANSWER_IS_RE.finditer(text)]
    candidates += [(m.start(), m["num"]) for m in _A_COLON_RE.finditer(text)]
    for pos, content in _boxed(text):
        if parse_number(content) is not None:
            candidates.append((pos, content))
        elif (m := _NUMBER_RE.search(content)) is not None:  # e.g. \boxed{18 \text{ dollars}}
            candidates.append((pos, m.group()))
    if candidates:
        return max(candidates)[1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


@lru_cache(maxsize=65536)
def reference_value(answer: str) -> float:
    """The number a reference answer (a full solution ending in "#### N", or a bare number) stands for."""
    text = extract_answer(answer, strict=True) if "####" in answer else answer
    value = parse_number(text) if text is not None else None
    if value is None:
        raise ValueError(f"reference answer has no final number: {answer[-80:]!r}")
    return value


def reward(response: str, answer: str, strict: bool = False) -> float:
    """1.0 when the response's final answer equals the reference's number (within 1e-6), else 0.0.

    Raises ValueError when the reference itself has no number: that is bad data, not a wrong response.
    """
    expected = reference_value(answer)
    text = extract_answer(response, strict=strict)
    value = parse_number(text) if text is not None else None
    return 1.0 if value is not None and abs(value - expected) <= TOLERANCE else 0.0


def load_jsonl(path: str | Path, uid_prefix: str | None = None) -> list[Example]:
    """Examples from a GSM8K-style JSONL file: one object with string "question" and "answer" per line.

    Uids are ``{uid_prefix}/{row}`` (row counted from 0; the prefix defaults to the file's stem). Any bad
    row raises DataError naming the file and the line.
    """
    path = Path(path)
    prefix = uid_prefix if uid_prefix is not None else path.stem
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    examples = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        examples.append(_row_to_example(row, where, f"{prefix}/{len(examples)}"))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _row_to_example(row: Any, where: str, uid: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
        if not row[key].strip():
            raise DataError(f"{where}: {key!r} is empty")
    try:
        reference_value(row["answer"])
    except ValueError:
        raise DataError(f"{where}: 'answer' has no final number (expected '#### N' or a number)") from None
    return Example(uid=uid, question=row["question"], answer=row["answer"])


@register_task("gsm8k")
class GSM8KTask(Task):
    """GSM8K with the shipped copy by default; ``strict`` makes the reward accept only "#### N"."""

    name = "gsm8k"

    def __init__(self, data_dir: str | Path | None = None, strict: bool = False):
        if not isinstance(strict, bool):
            raise TypeError(f"gsm8k option 'strict' must be a bool, got {strict!r}")
        self.data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
        if not self.data_dir.is_dir():
            raise DataError(f"{self.data_dir}: GSM8K data directory does not exist")
        self.strict = strict
        self._splits: dict[str, list[Example]] = {}

    def _split(self, split: str) -> list[Example]:
        if split not in self._splits:
            self._splits[split] = load_jsonl(self.data_dir / f"{split}.jsonl", uid_prefix=f"gsm8k/{split}")
        return list(self._splits[split])  # a copy, so a caller shuffling it leaves the cache alone

    def train(self) -> list[Example]:
        return self._split("train")

    def test(self) -> list[Example]:
        return self._split("test")

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        return render_prompt(example.question + INSTRUCTION, tokenizer)

    def reward(self, response: str, answer: str) -> float:
        return reward(response, answer, strict=self.strict)
