"""`evaluate`: one call that scores every split, runs the membership-inference attacks, the
multiple-choice benchmark and the routing comparison, and returns an `EvalReport`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from torch import nn

from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.generation import greedy_generate
from moe_unlearn.eval.items import ItemsLike, as_items
from moe_unlearn.eval.mcq import MCQ_TEMPLATE, mcq_accuracy
from moe_unlearn.eval.metrics import cut_at_stop, rouge_l, rouge_l_recall, split_metrics
from moe_unlearn.eval.mia import MIN_K_RATIO, mia_result, text_scores
from moe_unlearn.eval.report import EvalReport
from moe_unlearn.eval.routing import compare_routing
from moe_unlearn.eval.scoring import (
    PromptFormat,
    RoutingRecording,
    ScoredSplit,
    encode,
    encode_items,
    score_encoded,
)

VERBMEM_MAX_NEW_TOKENS = 128
N_EXAMPLES = 3


def verbmem_split(ids: Sequence[int], prefix_tokens: int, max_new: int) -> tuple[list[int], list[int]]:
    """(prefix, true continuation) of a text: the prefix is min(prefix_tokens, half the text) tokens
    (at least 1), the continuation the next <= max_new tokens."""
    cut = max(1, min(prefix_tokens, len(ids) // 2))
    return list(ids[:cut]), list(ids[cut:cut + max_new])


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _generation_metrics(model, tokenizer, scored: ScoredSplit, items, *, name: str, max_new_tokens: int,
                        verbmem_prefix_tokens: int, verbmem_max_new_tokens: int, stop_strings: Sequence[str],
                        batch_size: int, progress: bool) -> tuple[dict[str, list[float]], list[dict[str, str]]]:
    """Per-item QA ROUGE-L (F1, recall) and VerbMem of one split, plus a few examples."""
    qa = [(e, it) for e, it in zip(scored.encoded, items, strict=True) if it.is_qa]
    texts = [encode(tokenizer, it.text, True) for it in items if it.text is not None]
    out: dict[str, list[float]] = {"rouge": [], "recall": [], "verbmem": []}
    examples: list[dict[str, str]] = []
    if qa:
        gens = greedy_generate(model, tokenizer, [e.ids[: e.target_start] for e, _ in qa], max_new_tokens,
                               batch_size=batch_size, progress=progress, desc=f"{name}: QA answers")
        for (_, it), g in zip(qa, gens, strict=True):
            pred = cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), stop_strings).strip()
            out["rouge"].append(rouge_l(pred, it.answer))
            out["recall"].append(rouge_l_recall(pred, it.answer))
            if len(examples) < N_EXAMPLES:
                examples.append({"question": it.question, "answer": it.answer, "generated": pred})
    if texts:
        pairs = [verbmem_split(ids, verbmem_prefix_tokens, verbmem_max_new_tokens) for ids in texts if len(ids) >= 2]
        gens = greedy_generate(model, tokenizer, [p for p, _ in pairs], [len(t) for _, t in pairs],
                               batch_size=batch_size, progress=progress, desc=f"{name}: VerbMem")
        for (prefix, truth), g in zip(pairs, gens, strict=True):
            truth_text, pred = _decode(tokenizer, truth), _decode(tokenizer, g)
            out["verbmem"].append(rouge_l(pred, truth_text))
            if len(examples) < 2 * N_EXAMPLES:
                examples.append({"prefix": _decode(tokenizer, prefix), "continuation": truth_text, "generated": pred})
    return out, examples


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    forget: ItemsLike | None = None,
    retain: ItemsLike | None = None,
    holdout: ItemsLike | None = None,
    extra_splits: Mapping[str, ItemsLike] | None = None,
    mcq: ItemsLike | None = None,
    original: nn.Module | None = None,
    original_routing: Mapping[str, RoutingRecording] | None = None,
    target: Sequence[int] | None = None,
    reference_auc: float | Mapping[str, float] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    generate: bool = True,
    verbmem_prefix_tokens: int = 32,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    stop_strings: Sequence[str] = ("\n",),
    prompt_format: PromptFormat | None = None,
    mcq_template: str = MCQ_TEMPLATE,
    min_k_ratio: float = MIN_K_RATIO,
    progress: bool = True,
) -> EvalReport:
    """Evaluate `model` on every split given and return an EvalReport.

    Splits (forget / retain / holdout / extra_splits {name: data}): a .jsonl/.json/.txt path or a
    list of records ({question, answer} or {text}), strings or EvalItem (see eval.items).
    QA items are scored on the answer tokens of `prompt_format.template.format(question=...)` +
    `answer_prefix + answer`; text items on all their tokens.
    - quality per split: nll, token_accuracy, exact_match, and with generate=True QA ROUGE-L
      (greedy, <= max_new_tokens) and VerbMem (text items) -- see eval.metrics;
    - MIA (needs forget and holdout): LOSS, ZLib, Min-K%, Min-K%++ AUC (forget = 0, holdout = 1;
      high = forget still recognisable) and PrivLeak when `reference_auc` (float or {attack: auc})
      comes from a retrained / reference model -- see eval.mia;
    - mcq: a path or list of {question, choices, answer} -> accuracy by option log-likelihood;
    - routing vs the original model, for every split: `original` (a second model object, recorded
      here) or `original_routing` ({split name: RoutingRecording} from `record_routing` with the
      same tokenizer and prompt_format, e.g. recorded before applying a patch); `target` =
      (layer, expert) adds that expert's gate mass -- see eval.routing.
    The model is put in eval mode during the call and restored afterwards.
    """
    if original is not None and original_routing is not None:
        raise BadInputError("give either original (a model) or original_routing (recordings), not both")
    fmt = prompt_format or PromptFormat()
    raw: dict[str, ItemsLike] = {}
    for name, data in (("forget", forget), ("retain", retain), ("holdout", holdout)):
        if data is not None:
            raw[name] = data
    for name, data in (extra_splits or {}).items():
        if name in raw:
            raise BadInputError(f"extra split {name!r} clashes with a built-in split name; rename it")
        raw[name] = data
    if not raw and mcq is None:
        raise BadInputError("nothing to evaluate: give at least one of forget, retain, holdout, extra_splits, mcq")
    if original_routing is not None:
        unknown = set(original_routing) - set(raw)
        if unknown:
            raise BadInputError(f"original_routing has splits {sorted(unknown)} that were not given for evaluation")
    items = {name: as_items(data, name) for name, data in raw.items()}  # validate all input before any work
    encoded = {name: encode_items(tokenizer, its, fmt) for name, its in items.items()}

    t0 = time.perf_counter()
    report = EvalReport(splits={})
    want_routing = original is not None or original_routing is not None
    scored: dict[str, ScoredSplit] = {}
    for name, enc in encoded.items():
        rec = want_routing and (original is not None or name in original_routing)
        scored[name] = score_encoded(model, tokenizer, enc, batch_size=batch_size, record_routing=rec,
                                     progress=progress, desc=f"{name}: scoring")
        gen: dict[str, list[float]] = {"rouge": [], "recall": [], "verbmem": []}
        if generate:
            gen, report.examples[name] = _generation_metrics(
                model, tokenizer, scored[name], items[name], name=name, max_new_tokens=max_new_tokens,
                verbmem_prefix_tokens=verbmem_prefix_tokens, verbmem_max_new_tokens=verbmem_max_new_tokens,
                stop_strings=stop_strings, batch_size=batch_size, progress=progress)
        report.splits[name] = split_metrics(scored[name].items, [it.is_qa for it in items[name]],
                                            qa_rouge=gen["rouge"], qa_rouge_recall=gen["recall"],
                                            verbmem=gen["verbmem"])
        if rec:
            if original is not None:
                orig = score_encoded(original, tokenizer, enc, batch_size=batch_size, record_routing=True,
                                     progress=progress, desc=f"{name}: original routing").routing
            else:
                orig = original_routing[name]
            report.routing[name] = compare_routing(scored[name].routing, orig, target if name == "forget" else None)

    if "forget" in scored and "holdout" in scored:
        def per_text(name: str) -> list[dict[str, float]]:
            return [text_scores(s.logp, s.mu, s.sigma, e.text, min_k_ratio)
                    for s, e in zip(scored[name].items, scored[name].encoded, strict=True)]
        report.mia = mia_result(per_text("forget"), per_text("holdout"), reference_auc, min_k_ratio)
    if mcq is not None:
        report.mcq = mcq_accuracy(model, tokenizer, mcq, template=mcq_template, batch_size=batch_size,
                                  progress=progress, max_length=fmt.max_length)
    report.meta = {
        "model": type(model).__name__,
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "seconds": round(time.perf_counter() - t0, 3),
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "generate": generate,
        "verbmem_prefix_tokens": verbmem_prefix_tokens, "verbmem_max_new_tokens": verbmem_max_new_tokens,
        "prompt_template": fmt.template, "answer_prefix": fmt.answer_prefix, "min_k_ratio": min_k_ratio,
        "target": list(target) if target is not None else None,
    }
    return report
