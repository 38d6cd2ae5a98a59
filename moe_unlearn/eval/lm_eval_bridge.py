"""A bridge to lm-evaluation-harness (optional: `pip install 'moe-unlearn[eval]'`).

`run_lm_eval(model, tokenizer, ["wmdp_local"], include_path="tasks/")` runs lm-eval's
`simple_evaluate` on the model object in memory, so an applied unlearning patch is what gets
scored (no save and reload). Task YAML files in `include_path` are found by lm-eval's
TaskManager; `write_mcq_task` writes such a task (WMDP's prompt: choices listed A-D, the
letter's log-likelihood scored, metrics acc and acc_norm) from a local multiple-choice jsonl,
so nothing is downloaded. lm-eval's own tasks (wmdp_bio, mmlu, ...) need their datasets in the
local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from moe_unlearn.atomic import write_text
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.items import ItemsLike, as_mcq_items

_LETTERS = "ABCDEFGHIJ"


def require_lm_eval() -> None:
    """Raise one clear error when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise BadInputError("lm-eval tasks need lm-evaluation-harness: pip install 'moe-unlearn[eval]' "
                            f"(import failed: {exc})") from None


def write_mcq_task(directory: str | os.PathLike, name: str, data: ItemsLike) -> Path:
    """Write `<directory>/<name>.yaml` and `<name>.jsonl`: an lm-eval multiple-choice task over
    local records {question, choices, answer (index or letter)}, in WMDP's format (the choices
    listed as "A. ...", the letters as options). Returns the YAML path."""
    if not name.replace("_", "").isalnum():
        raise BadInputError(f"task name {name!r}: use letters, digits and underscores")
    items = as_mcq_items(data)
    if any(len(m.choices) > len(_LETTERS) for m in items):
        raise BadInputError(f"write_mcq_task supports up to {len(_LETTERS)} choices")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps({"question": m.question, "choices": list(m.choices), "answer": m.answer}) + "\n"
                   for m in items)
    data_path = write_text(out / f"{name}.jsonl", rows)
    text = ('"{{question.strip()}}{% for c in choices %}\\n{{ \'' + _LETTERS
            + '\'[loop.index0] }}. {{c}}{% endfor %}\\nAnswer:"')
    choices = "\"{{ " + str(list(_LETTERS)) + "[:choices|length] }}\""
    yaml = "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(Path(data_path).resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {text}",
        f"doc_to_choice: {choices}",
        "doc_to_target: answer",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1",
        "",
    ])
    return write_text(out / f"{name}.yaml", yaml)


def run_lm_eval(model: nn.Module, tokenizer, tasks: Sequence[str], *, include_path: str | os.PathLike | None = None,
                batch_size: int = 16, limit: int | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """{task: {metric: value}} from lm-eval's simple_evaluate on the in-memory `model` (stderr off)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from moe_unlearn.eval.scoring import model_device

    if include_path is not None and not Path(include_path).is_dir():
        raise BadInputError(f"lm-eval include path {include_path} is not a folder of task YAML files")
    manager = None
    if include_path is not None:  # indexing lm-eval's thousands of built-in tasks takes a minute: local first
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BadInputError(f"lm-eval does not know task(s) {unknown}; put their YAML files in include_path")
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
    return out
