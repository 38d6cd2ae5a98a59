"""What the evaluation reads: `EvalItem` (a QA pair or a plain text) and `McqItem`, from lists or jsonl.

Accepted inputs for a split (see `as_items`):
- a path to a `.jsonl` / `.json` file (records) or a `.txt` file (one text per non-empty line);
- a list of `EvalItem`, of `str` (plain texts), or of dicts with `question`+`answer` or `text`
  (the record format of `moe_unlearn.data.load_records` and of the benchmark generator).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_unlearn.errors import DataError

QUESTION_FIELDS = ("question", "prompt", "query")
ANSWER_FIELDS = ("answer", "completion", "response")
TEXT_FIELDS = ("text", "content", "statement")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation example: a QA pair (question and answer set) or a plain text (text set)."""

    question: str | None = None
    answer: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        qa = self.question is not None and self.answer is not None
        if qa == (self.text is not None) or (self.question is None) != (self.answer is None):
            raise DataError("an EvalItem holds either question and answer, or text; got "
                            f"question={self.question!r}, answer={self.answer!r}, text={self.text!r}")
        if qa and not str(self.answer).strip():
            raise DataError(f"empty answer for question {self.question!r}; give every QA item a non-empty answer")
        if not qa and not str(self.text).strip():
            raise DataError("empty text item; remove blank texts from the data")

    @property
    def is_qa(self) -> bool:
        return self.question is not None


@dataclass(frozen=True)
class McqItem:
    """A multiple-choice question: `answer` is the index of the correct choice."""

    question: str
    choices: tuple[str, ...]
    answer: int


ItemsLike = str | os.PathLike | Sequence[Any]


def _first(record: Mapping[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        if record.get(name) is not None:
            return record[name]
    return None


def item_from_record(record: Any, where: str = "record") -> EvalItem:
    """A dict with question/answer (or prompt/completion) or text, a str, or an EvalItem -> EvalItem."""
    if isinstance(record, EvalItem):
        return record
    if isinstance(record, str):
        return EvalItem(text=record)
    if isinstance(record, Mapping):
        q, a = _first(record, QUESTION_FIELDS), _first(record, ANSWER_FIELDS)
        if q is not None and a is not None:
            return EvalItem(question=str(q), answer=str(a))
        t = _first(record, TEXT_FIELDS)
        if t is not None:
            return EvalItem(text=str(t))
        raise DataError(f"{where}: needs fields question+answer (or {'/'.join(QUESTION_FIELDS)} + "
                        f"{'/'.join(ANSWER_FIELDS)}) or text (or {'/'.join(TEXT_FIELDS)}); got keys {sorted(record)}")
    raise DataError(f"{where}: expected a dict, a string or an EvalItem, got {type(record).__name__}")


def read_records(path: str | os.PathLike) -> list[Any]:
    """Records of a .jsonl (one JSON value per line), .json (a list) or .txt (one text per line) file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; pass a .jsonl, .json or .txt file")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    if suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON ({exc}); a .json file must hold a list of records") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: a .json file must hold a list of records, got {type(data).__name__}")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: not valid JSON ({exc.msg}); each line of a .jsonl file is one record") from None
    return records


def as_items(data: ItemsLike, name: str = "data") -> list[EvalItem]:
    """Normalise one split's data (path or list, see module docstring) to a non-empty list of EvalItem."""
    if isinstance(data, (str, os.PathLike)) and not (isinstance(data, str) and "\n" in data):
        path = Path(data)
        if path.suffix.lower() in (".jsonl", ".json", ".txt") or path.exists():
            records = read_records(path)
            items = [item_from_record(r, f"{path} record {i + 1}") for i, r in enumerate(records)]
            if not items:
                raise DataError(f"{path}: no records; split {name!r} needs at least one item")
            return items
    if isinstance(data, str):
        raise DataError(f"split {name!r}: got a string that is not a .jsonl/.json/.txt path; pass a path or a list "
                        "of texts")
    items = [item_from_record(r, f"split {name!r} item {i}") for i, r in enumerate(data)]
    if not items:
        raise DataError(f"split {name!r} is empty; pass at least one item or leave the split out")
    return items


def mcq_from_record(record: Any, where: str = "record") -> McqItem:
    """{question, choices, answer} with answer an index (0-based) or a letter ("A", "b", ...)."""
    if isinstance(record, McqItem):
        return record
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a dict with question, choices, answer")
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; an MCQ record needs question, choices, answer")
    choices = record["choices"]
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise DataError(f"{where}: choices must be a list of at least 2 options")
    ans = record["answer"]
    if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().isalpha():
        idx = ord(ans.strip().upper()) - ord("A")
    elif isinstance(ans, str) and ans.strip().isdigit():
        idx = int(ans.strip())
    elif isinstance(ans, int) and not isinstance(ans, bool):
        idx = ans
    else:
        raise DataError(f"{where}: answer must be a 0-based index or a letter, got {ans!r}")
    if not 0 <= idx < len(choices):
        raise DataError(f"{where}: answer {ans!r} is out of range for {len(choices)} choices")
    return McqItem(str(record["question"]), tuple(str(c) for c in choices), idx)


def as_mcq_items(data: ItemsLike) -> list[McqItem]:
    """MCQ items from a .jsonl/.json path or a list of records."""
    if isinstance(data, (str, os.PathLike)):
        records = read_records(data)
        where = str(data)
    else:
        records, where = list(data), "mcq"
    items = [mcq_from_record(r, f"{where} record {i + 1}") for i, r in enumerate(records)]
    if not items:
        raise DataError(f"{where}: no multiple-choice records")
    return items
