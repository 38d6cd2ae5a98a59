"""What the evaluation reads: `EvalItem` (a QA pair, a plain text, or both) and `McqItem`.

Accepted inputs for a split (see `as_items`):
- a path to a `.jsonl` file, a `.txt` file (one text per non-empty line) or a datasets
  save_to_disk folder, or a `datasets.Dataset` (all read by `moe_unlearn.data.load_records`);
- a list of `EvalItem`, of `str` (plain texts), or of dicts with `question`+`answer` or `text`
  (the record format of `moe_unlearn.data.load_records` and of the benchmark generator).
MUSE's files read as they are: knowmem `{question, answer}` QA lists, privleak lists of texts, and
verbmem `{prompt, gt}` records (a text `prompt + gt` whose VerbMem prefix is exactly `prompt`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moe_unlearn.errors import DataError
from moe_unlearn.validate import check_text

QUESTION_FIELDS = ("question", "prompt", "query")
ANSWER_FIELDS = ("answer", "completion", "response")
TEXT_FIELDS = ("text", "content", "statement")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation example: a QA pair (question and answer), a plain text, or both (a QA pair
    with a statement of the same fact, as the benchmark generator writes). The QA form is what
    gets scored (NLL, accuracy, exact match, ROUGE-L, MIA); a text also gets VerbMem."""

    question: str | None = None
    answer: str | None = None
    text: str | None = None
    prefix: str | None = None  # VerbMem prompt of a MUSE {prompt, gt} record: text = prefix + gt

    def __post_init__(self) -> None:
        if self.prefix is not None and (self.text is None or not self.text.startswith(self.prefix)
                                        or len(self.text) == len(self.prefix) or not self.prefix):
            raise DataError(f"a VerbMem item needs a non-empty prefix that starts its text and a continuation "
                            f"after it; got prefix={self.prefix!r}, text={self.text!r}")
        if (self.question is None) != (self.answer is None) or (self.question is None and self.text is None):
            raise DataError("an EvalItem holds question and answer, or text, or all three; got "
                            f"question={self.question!r}, answer={self.answer!r}, text={self.text!r}")
        if self.answer is not None and not str(self.answer).strip():
            raise DataError(f"empty answer for question {self.question!r}; give every QA item a non-empty answer")
        if self.text is not None and not str(self.text).strip():
            raise DataError("empty text item; remove blank texts from the data")

    @property
    def is_qa(self) -> bool:
        return self.question is not None

    @property
    def continuation(self) -> str | None:
        """The true VerbMem continuation of a {prompt, gt} item (None for other items)."""
        return None if self.prefix is None else self.text[len(self.prefix):]


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
        if record.get("gt") is not None and record.get("prompt") is not None:  # MUSE verbmem
            prompt, gt = check_text(f"{where}: prompt", record["prompt"]), check_text(f"{where}: gt", record["gt"])
            return EvalItem(text=prompt + gt, prefix=prompt)
        q, a, t = _first(record, QUESTION_FIELDS), _first(record, ANSWER_FIELDS), _first(record, TEXT_FIELDS)
        t = None if t is None else check_text(f"{where}: text", t)
        if q is not None and a is not None:
            return EvalItem(question=check_text(f"{where}: question", q), answer=check_text(f"{where}: answer", a),
                            text=t)
        if t is not None:
            return EvalItem(text=t)
        raise DataError(f"{where}: needs fields question+answer (or {'/'.join(QUESTION_FIELDS)} + "
                        f"{'/'.join(ANSWER_FIELDS)}) or text (or {'/'.join(TEXT_FIELDS)}); got keys {sorted(record)}")
    raise DataError(f"{where}: expected a dict, a string or an EvalItem, got {type(record).__name__}")


def read_records(source: Any) -> list[Any]:
    """Records of a path (.jsonl, .txt, or a datasets save_to_disk folder) or a datasets.Dataset,
    read by `moe_unlearn.data.load_records` so every command accepts the same files."""
    from moe_unlearn.data import load_records

    return load_records(source)


def is_source(data: Any) -> bool:
    """Whether `data` names records to read (a path, a dataset) rather than holding them."""
    return isinstance(data, os.PathLike) or hasattr(data, "column_names") or (
        isinstance(data, str) and "\n" not in data)


def as_items(data: ItemsLike, name: str = "data") -> list[EvalItem]:
    """Normalise one split's data (path, dataset or list, see module docstring) to a non-empty list of EvalItem."""
    if is_source(data):
        records, where = read_records(data), str(data) if not hasattr(data, "column_names") else "dataset"
    elif isinstance(data, str):
        raise DataError(f"split {name!r}: got a multi-line string; pass a path or a list of texts")
    else:
        records, where = list(data), f"split {name!r}"
    items = [item_from_record(r, f"{where} item {i}") for i, r in enumerate(records)]
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
    if not isinstance(record["question"], str) or not record["question"].strip():
        raise DataError(f"{where}: question must be a non-empty string")
    if any(not isinstance(c, str) or not c.strip() for c in choices):
        raise DataError(f"{where}: every choice must be a non-empty string, got {list(choices)!r}")
    if len({c.strip() for c in choices}) != len(choices):  # a tie would always pick the first copy
        raise DataError(f"{where}: choices {list(choices)!r} repeat an option; each must be distinct")
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
    if is_source(data):
        records, where = read_records(data), str(data)
    else:
        records, where = list(data), "mcq"
    items = [mcq_from_record(r, f"{where} record {i + 1}") for i, r in enumerate(records)]
    if not items:
        raise DataError(f"{where}: no multiple-choice records")
    return items
