"""Reading text data and turning it into padded batches, shared by every command.

Sources (`load_records` / `load_texts`):
- a list of strings (or of dicts, or a `datasets.Dataset`);
- a `.txt` file: one document per line, blank lines skipped;
- a `.jsonl` file: one JSON object per line, blank lines skipped;
- a directory written by `datasets.Dataset.save_to_disk`.

Batches (`tokenize_batches`) are padded by this module, not by the tokenizer, so
the user's tokenizer object is never mutated (no pad token is added to it) and
padding / truncation are the same for every tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.validate import (
    check_regular_file,
    check_text,
    data_limit_hint,
    format_bytes,
    max_data_bytes,
    parse_json,
    read_json_file,
)

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"
CHAT_TEMPLATE = "chat"  # as a template: the tokenizer's own chat template (`chat_parts`)

DataSource = str | os.PathLike | Sequence[str] | Sequence[Mapping[str, Any]] | Any


# -- records ------------------------------------------------------------------

@dataclass(frozen=True)
class _Located:
    where: str  # "file.jsonl line 3", "item 2", "dataset DIR row 5": for error messages
    record: dict[str, Any]


def _iter_file_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str]]:
    """The lines of a text file, reading at most `max_bytes` (a file that grew past the size checked
    up front, or a huge file read only for its first records, stops there with a DataError)."""
    seen = lineno = 0
    try:
        with open(path, "rb") as fh:
            while raw := fh.readline(max_bytes - seen + 1):
                seen += len(raw)
                if seen > max_bytes:
                    raise DataError(f"data file {path} holds more than the {format_bytes(max_bytes)} the "
                                    f"data readers accept; {data_limit_hint()}")
                text = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
                for piece in text.split("\r"):  # a lone CR ends a line too, as in Python's text mode
                    lineno += 1
                    yield lineno, piece
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; pass a readable UTF-8 .txt/.jsonl file "
                        "or a datasets save_to_disk directory") from exc


def _iter_jsonl(path: Path, max_bytes: int) -> Iterator[_Located]:
    for lineno, line in _iter_file_lines(path, max_bytes):
        if not line.strip():
            continue
        obj = parse_json(line, what=f"{path} line {lineno} (each line of a .jsonl file must be one JSON object)")
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield _Located(f"{path} line {lineno}", obj)


def _iter_json(path: Path, max_bytes: int) -> Iterator[_Located]:
    """A .json file holding one list of records or strings (MUSE ships its splits this way)."""
    obj = read_json_file(path, what="data file", max_bytes=max_bytes, hint=data_limit_hint())
    if not isinstance(obj, list):
        raise DataError(f"{path}: a .json data file must hold a list of records or strings, got "
                        f"{type(obj).__name__}; use .jsonl for one record per line")
    for i, item in enumerate(obj):
        where = f"{path} item {i}"
        if isinstance(item, str):
            yield _Located(where, {"text": item})
        elif isinstance(item, dict):
            yield _Located(where, item)
        else:
            raise DataError(f"{where}: expected a JSON object or string, got {type(item).__name__}")


def _iter_txt(path: Path, max_bytes: int) -> Iterator[_Located]:
    for lineno, line in _iter_file_lines(path, max_bytes):
        if line.strip():
            yield _Located(f"{path} line {lineno}", {"text": line})


def _iter_dataset(ds: Any, name: str) -> Iterator[_Located]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
        raise DataError(f"{name} holds several splits ({', '.join(ds.keys())}); save or pass one split only")
    for i, row in enumerate(ds):
        yield _Located(f"{name} row {i}", dict(row))


def _load_disk_dataset(path: Path) -> Any:
    try:
        from datasets import load_from_disk

        return load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError / ValueError / others for bad dirs
        raise DataError(f"cannot load {path} as a dataset saved with datasets' save_to_disk: {exc}") from exc


def check_data_file(path: str | os.PathLike, *, whole: bool = True) -> int:
    """The data-size limit (`max_data_bytes`), after checking `path` is a regular file and, when it is read
    `whole`, no larger than the limit; DataError naming the limit and how to raise it otherwise. Every
    reader of data files (these, and the LoRAMoE reader that hands .jsonl files to `datasets`) goes
    through it."""
    cap = max_data_bytes()
    check_regular_file(path, what="data file", max_bytes=cap if whole else None, hint=data_limit_hint())
    return cap


def _iter_source(source: DataSource, *, whole: bool = True) -> Iterator[_Located]:
    """The records of `source`. A data file must be a regular file (a FIFO would hang the reader, a link
    to /dev/zero never end) of at most `max_data_bytes()`: checked on its size before anything is read when
    the whole file is wanted (`whole`), and on the bytes read while streaming in every case (a .txt/.jsonl
    read for its first `limit` records may be larger; only what is read counts)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            yield from _iter_dataset(_load_disk_dataset(path), str(path))
            return
        suffix = path.suffix.lower()
        cap = check_data_file(path, whole=whole or suffix == ".json")
        if suffix == ".jsonl":
            yield from _iter_jsonl(path, cap)
        elif suffix == ".json":
            yield from _iter_json(path, cap)
        elif suffix == ".txt":
            yield from _iter_txt(path, cap)
        else:
            raise DataError(f"{path}: unknown data format {suffix!r}; use .txt (one document per line), "
                            ".jsonl, .json (a list of records or strings, as MUSE ships), or a directory written by datasets' save_to_disk")
        return
    if hasattr(source, "column_names"):  # a datasets.Dataset object
        yield from _iter_dataset(source, "dataset")
        return
    if isinstance(source, (bytes, Mapping)) or not isinstance(source, Sequence):
        raise DataError(f"unsupported data source of type {type(source).__name__}; pass a list of strings, "
                        "a .txt/.jsonl path or a datasets save_to_disk directory")
    for i, item in enumerate(source):
        if isinstance(item, str):
            yield _Located(f"item {i}", {"text": item})
        elif isinstance(item, Mapping):
            yield _Located(f"item {i}", dict(item))
        else:
            raise DataError(f"item {i} of the data list is a {type(item).__name__}; items must be strings or dicts")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise BadInputError(f"limit must be a positive integer or None, got {limit!r}")


def load_records(source: DataSource, *, limit: int | None = None,
                 required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every record of `source` as a dict (strings and .txt lines become {"text": ...}).

    `required` names fields every record must have (e.g. ("prompt", "response", "type")
    for LoRAMoE fine-tuning); a record without one raises DataError naming where it is.
    """
    _check_limit(limit)
    out: list[dict[str, Any]] = []
    for loc in _iter_source(source, whole=limit is None):
        missing = [f for f in required if f not in loc.record]
        if missing:
            raise DataError(f"{loc.where}: missing field(s) {missing}; it has {sorted(loc.record)}")
        out.append(loc.record)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"no records in {_describe(source)}; the data is empty")
    return out


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass(frozen=True)
class Example:
    """One training text as prompt + completion (text = prompt + completion).

    A question/answer record filled into the template has prompt = the template up to the answer
    (trailing whitespace moved into the completion, so a BPE tokenizer sees " answer" as usual)
    and completion = the answer (plus anything the template puts after it). A plain text has an
    empty prompt. Answer-only losses (`tokenize_batches(..., loss_tokens="answer")`) score the
    completion tokens only, as the evaluation does for QA items."""

    prompt: str
    completion: str
    # False when the texts already hold the tokenizer's special tokens (a chat template writes its own):
    # the prompt is then encoded with add_special_tokens=False, as the evaluation encodes it
    special_tokens: bool = True

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def chat_parts(tokenizer: Any, question: str, answer: str | None = None) -> tuple[str, str]:
    """(prompt, completion) of one question/answer turn under the tokenizer's chat template: prompt =
    the user turn plus the assistant header (`add_generation_prompt=True`), completion = the rest of
    the two-turn conversation (the answer and the template's end-of-turn text). Training and
    evaluation both split a QA record this way, so they see the same tokens. The prompt text holds
    the template's special tokens: encode it with add_special_tokens=False."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template; drop the chat "
                            "template option or use the tokenizer of an instruct/chat model")
    user = [{"role": "user", "content": str(question)}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": str(answer)}],
                                             tokenize=False)
    except Exception as exc:  # jinja errors (a template that rejects these roles, ...)
        raise BadInputError(f"the tokenizer's chat template does not apply to a user/assistant turn: "
                            f"{' '.join(str(exc).split())[:200]}") from None
    if not full.startswith(prompt):
        raise BadInputError("the tokenizer's chat template renders the question differently with and without "
                            "the answer, so the answer cannot be split off token-exactly; use a text template")
    return prompt, full[len(prompt):]


def _record_example(loc: _Located, field: str | None, template: str, tokenizer: Any = None) -> Example:
    rec = loc.record
    if field is not None:
        if field not in rec:
            raise DataError(f"{loc.where}: no field {field!r}; it has {sorted(rec)}")
        value = rec[field]
    elif "text" in rec:
        value = rec["text"]
    elif template == CHAT_TEMPLATE:
        if "question" not in rec or "answer" not in rec:
            raise DataError(f"{loc.where}: no 'text' field and no 'question' and 'answer' for the chat template; "
                            f"it has {sorted(rec)}")
        if tokenizer is None:
            raise BadInputError("the chat template needs the tokenizer (load_examples(..., tokenizer=tok))")
        prompt, completion = chat_parts(tokenizer, rec["question"], rec["answer"])
        return Example(prompt, completion, special_tokens=False)
    else:
        needed = _template_fields(template)
        if not needed or any(n not in rec for n in needed):
            raise DataError(f"{loc.where}: no 'text' field and not every template field {needed} is present; "
                            f"it has {sorted(rec)}; name the text field with field=... (CLI: --field)")
        for name in needed:
            _field_text(loc, name, rec[name])
        head, found, tail = template.partition("{answer}")
        try:
            if not found:  # a template without an answer slot: the whole text is scored
                return Example("", template.format_map(rec))
            prompt, rest = head.format_map(rec), tail.format_map(rec)
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"{loc.where}: template {template!r} does not apply: {exc}") from exc
        stripped = prompt.rstrip()
        return Example(stripped, prompt[len(stripped):] + _field_text(loc, "answer", rec["answer"]) + rest)
    if not isinstance(value, str):
        raise DataError(f"{loc.where}: the text field holds a {type(value).__name__}, expected a string")
    return Example("", _field_text(loc, field or "text", value))


def _field_text(loc: _Located, name: str, value: Any) -> str:
    return check_text(f"{loc.where}: field {name!r}", value)


def load_examples(source: DataSource, *, field: str | None = None, template: str | None = DEFAULT_TEMPLATE,
                  limit: int | None = None, tokenizer: Any = None) -> list[Example]:
    """The documents of `source` as `Example`s (prompt + completion).

    Which text a record gives: the named `field` if given; else its `text` field; else
    `template` filled from the record (by default question/answer pairs, whose question part
    becomes the prompt); template "chat" (`CHAT_TEMPLATE`) renders question/answer records with the
    `tokenizer`'s chat template instead (`chat_parts`). Blank texts are skipped. Raises DataError for an empty source, an
    unreadable file, or a record without the field (naming the file, line and the fields it has).
    """
    _check_limit(limit)
    template = DEFAULT_TEMPLATE if template is None else template
    out: list[Example] = []
    for loc in _iter_source(source, whole=limit is None):
        ex = _record_example(loc, field, template, tokenizer)
        if not ex.text.strip():
            continue
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"no non-blank texts in {_describe(source)}; the data is empty")
    return out


def load_texts(source: DataSource, *, field: str | None = None, template: str | None = DEFAULT_TEMPLATE,
               limit: int | None = None, tokenizer: Any = None) -> list[str]:
    """The documents of `source` as plain strings (`load_examples` without the prompt split)."""
    return [e.text for e in load_examples(source, field=field, template=template, limit=limit,
                                          tokenizer=tokenizer)]


def _describe(source: DataSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"the given {type(source).__name__}"


# -- tokenization -------------------------------------------------------------

def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token (the usual
    choice for decoder-only LMs). Padding positions are masked, so the choice never matters
    for the results."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise BadInputError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token first")


LOSS_TOKENS = ("answer", "all")


@dataclass
class TokenizedBatches:
    """Tokenized texts that yield padded batches; iterate it (any number of times) for dicts of
    input_ids [B, S], attention_mask [B, S] (1 = real token) and labels [B, S] (-100 on padding
    and on the first `label_starts[i]` tokens of text i, the prompt of a QA example under
    answer-only losses).

    num_truncated counts texts longer than max_length (cut to max_length tokens, keeping the
    tokenizer's truncation side). Each batch is padded to its own longest text.
    """

    sequences: list[torch.Tensor]  # int64 [n_i] per text, already truncated
    batch_size: int
    max_length: int
    padding_side: str
    pad_token_id: int
    num_truncated: int
    label_starts: list[int] | None = None  # per text: first position with a label (None = all 0)

    def __post_init__(self) -> None:
        if self.label_starts is None:
            self.label_starts = [0] * len(self.sequences)
        if len(self.label_starts) != len(self.sequences):
            raise BadInputError(f"label_starts has {len(self.label_starts)} entries for {len(self.sequences)} texts")

    @property
    def num_texts(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.sequences)

    @property
    def num_label_tokens(self) -> int:
        """Positions a next-token loss scores (a label with a token before it)."""
        return sum(max(0, int(s.numel()) - max(start, 1)) for s, start in zip(self.sequences, self.label_starts,
                                                                                 strict=True))

    def __len__(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.sequences), self.batch_size):
            stop = start + self.batch_size
            yield pad_batch(self.sequences[start:stop], pad_token_id=self.pad_token_id,
                            padding_side=self.padding_side, label_starts=self.label_starts[start:stop])

    def shuffled(self, seed: int) -> TokenizedBatches:
        """The same texts in a seeded random order (so batches group different texts per seed)."""
        order = list(range(len(self.sequences)))
        random.Random(seed).shuffle(order)
        return dataclasses.replace(self, sequences=[self.sequences[i] for i in order],
                                   label_starts=[self.label_starts[i] for i in order])


def pad_batch(sequences: Sequence[torch.Tensor], *, pad_token_id: int, padding_side: str = "right",
              label_starts: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Pad 1-D id tensors to one [B, S] batch with attention_mask and labels (-100 on padding and,
    with label_starts, on the first label_starts[i] tokens of row i)."""
    if padding_side not in ("right", "left"):
        raise BadInputError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max((int(s.numel()) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    scored = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = int(seq.numel())
        first = width - n if padding_side == "left" else 0
        ids[row, first:first + n] = seq
        mask[row, first:first + n] = 1
        skip = min(label_starts[row], n) if label_starts is not None else 0
        scored[row, first + skip:first + n] = True
    labels = ids.masked_fill(~scored, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# A text longer than this many characters per allowed token is cut before it is tokenized (a 200 MB line
# would otherwise need tens of GB inside the tokenizer); the cut grows until it yields enough tokens.
_CHARS_PER_TOKEN = 16
_CUT_MARGIN = 16  # tokens kept beyond the limit, so the cut's edge never reaches the tokens that are kept


def encode_capped(tokenizer: Any, texts: Sequence[str], max_tokens: int, *, add_special_tokens: bool = True,
                  keep_last: bool = False) -> list[list[int]]:
    """Token ids of each text, as the tokenizer gives them for the whole text, except that a text longer than
    needed is tokenized only in part: the result then has more than `max_tokens` ids (so callers see it as
    truncated) and its first (last, with keep_last) `max_tokens` ids are those of the whole text."""
    budget = max(4096, _CHARS_PER_TOKEN * (max_tokens + _CUT_MARGIN))

    def run(batch: list[str]) -> list[list[int]]:
        # verbose=False: the "longer than the model maximum" warning is moot, callers truncate
        enc = tokenizer(batch, add_special_tokens=add_special_tokens, truncation=False, padding=False,
                        return_attention_mask=False, verbose=False)
        return [list(ids) for ids in enc["input_ids"]]

    out: list[list[int]] = [[] for _ in texts]
    short = [i for i, t in enumerate(texts) if len(t) <= budget]
    chunk = 1024  # tokenizer batch calls are much faster than one call per text
    for start in range(0, len(short), chunk):
        idx = short[start:start + chunk]
        for i, ids in zip(idx, run([texts[i] for i in idx]), strict=True):
            out[i] = ids
    for i, text in enumerate(texts):
        if len(text) <= budget:
            continue
        cut = budget
        while True:
            ids = run([text[-cut:] if keep_last else text[:cut]])[0]
            if len(ids) > max_tokens + _CUT_MARGIN or cut >= len(text):
                break
            cut *= 4
        out[i] = ids
    return out


def _encode_all(tokenizer: Any, texts: list[str], add_special_tokens: bool, max_tokens: int,
                keep_last: bool) -> list[list[int]]:
    return encode_capped(tokenizer, texts, max_tokens, add_special_tokens=add_special_tokens, keep_last=keep_last)


def tokenize_batches(texts: Sequence[str | Example], tokenizer: Any, *, batch_size: int, max_length: int,
                     padding_side: str | None = None, add_special_tokens: bool = True,
                     loss_tokens: str = "answer") -> TokenizedBatches:
    """Tokenize `texts` once and return an iterable of padded batches (see TokenizedBatches).

    texts: strings (every token scored) or `Example`s; an Example with a prompt is encoded as
    prompt ids (special tokens added, unless its special_tokens is False: a chat template's text)
    + completion ids (none added), exactly as the evaluation
    encodes a QA item, and with loss_tokens="answer" its prompt positions get label -100;
    loss_tokens="all" scores every token of every text.
    padding_side None uses the tokenizer's own (right if it has none). Tokenizers without a
    pad token pad with eos (see `pad_token_id`); the tokenizer object is not modified. Texts that
    tokenize to nothing are kept as empty rows (no valid tokens), so batch i always holds
    texts[i*batch_size:(i+1)*batch_size].
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise BadInputError(f"max_length must be a positive integer, got {max_length!r}")
    if isinstance(texts, str):
        raise BadInputError("texts must be a list of strings, not one string; wrap it in a list")
    if loss_tokens not in LOSS_TOKENS:
        raise BadInputError(f"loss_tokens must be one of {', '.join(LOSS_TOKENS)}, got {loss_tokens!r}")
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("right", "left"):
        raise BadInputError(f"padding_side must be 'right' or 'left', got {side!r}")
    pad_id = pad_token_id(tokenizer)
    keep_last = getattr(tokenizer, "truncation_side", "right") == "left"
    examples = [t if isinstance(t, Example) else Example("", t) for t in texts]
    with_prompt = [i for i, e in enumerate(examples) if e.prompt]
    plain = [i for i, e in enumerate(examples) if not e.prompt]
    ids_of: dict[int, list[int]] = {}
    start_of: dict[int, int] = {}
    cap = dict(max_tokens=max_length, keep_last=keep_last)  # a huge text is cut before it is tokenized
    for i, ids in zip(plain, _encode_all(tokenizer, [examples[i].text for i in plain], add_special_tokens, **cap),
                      strict=True):
        ids_of[i], start_of[i] = ids, 0
    prompts: list[list[int]] = [[] for _ in with_prompt]
    for special in (True, False):  # chat-template prompts carry their own special tokens
        pos = [k for k, i in enumerate(with_prompt) if examples[i].special_tokens == special]
        enc = _encode_all(tokenizer, [examples[with_prompt[k]].prompt for k in pos], add_special_tokens and special,
                          **cap)
        for k, ids in zip(pos, enc, strict=True):
            prompts[k] = ids
    completions = _encode_all(tokenizer, [examples[i].completion for i in with_prompt], False, **cap)
    for i, p_ids, c_ids in zip(with_prompt, prompts, completions, strict=True):
        ids_of[i], start_of[i] = p_ids + c_ids, (len(p_ids) if loss_tokens == "answer" else 0)
    sequences: list[torch.Tensor] = []
    starts: list[int] = []
    truncated = 0
    for i in range(len(examples)):
        ids, first = ids_of[i], start_of[i]
        if len(ids) > max_length:
            truncated += 1
            if keep_last:
                first = max(0, first - (len(ids) - max_length))
                ids = ids[-max_length:]
            else:
                ids = ids[:max_length]
        sequences.append(torch.tensor(ids, dtype=torch.long))
        starts.append(first)
    return TokenizedBatches(sequences=sequences, batch_size=batch_size, max_length=max_length, padding_side=side,
                            pad_token_id=pad_id, num_truncated=truncated, label_starts=starts)


__all__ = ["CHAT_TEMPLATE", "DEFAULT_TEMPLATE", "LOSS_TOKENS", "Example", "chat_parts", "TokenizedBatches", "encode_capped", "load_examples",
           "load_records", "load_texts", "pad_batch", "pad_token_id", "tokenize_batches"]
