"""`evaluate`: one call that scores every split, runs the membership-inference attacks, the
multiple-choice benchmark and the routing comparison, and returns an `EvalReport`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

from torch import nn

from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.conventions import Convention, get_convention
from moe_unlearn.eval.generation import greedy_generate
from moe_unlearn.eval.items import EvalItem, ItemsLike, as_items
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
from moe_unlearn.validate import MAX_ITEMS, check_generation_length, check_int, config_positions

VERBMEM_MAX_NEW_TOKENS = 128
N_EXAMPLES = 3


def verbmem_split(ids: Sequence[int], prefix_tokens: int, max_new: int) -> tuple[list[int], list[int]]:
    """(prefix, true continuation) of a text: the prefix is min(prefix_tokens, half the text) tokens
    (at least 1), the continuation the next <= max_new tokens."""
    cut = max(1, min(prefix_tokens, len(ids) // 2))
    return list(ids[:cut]), list(ids[cut:cut + max_new])


def verbmem_pairs(tokenizer, items: Sequence[EvalItem], prefix_tokens: int,
                  max_new: int) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, true continuation ids) of every item with a text. A MUSE {prompt, gt} item: the
    prompt (special tokens added) and, as MUSE does, gt tokenized with special tokens and cut to
    max_new tokens; any other text: `verbmem_split` of its ids. Texts of < 2 tokens are skipped."""
    pairs = []
    for it in items:
        if it.prefix is not None:
            pairs.append((encode(tokenizer, it.prefix, True), encode(tokenizer, it.continuation, True)[:max_new]))
        elif it.text is not None:
            ids = encode(tokenizer, it.text, True)
            if len(ids) >= 2:
                pairs.append(verbmem_split(ids, prefix_tokens, max_new))
    return pairs


def few_shot_prefix(examples: Sequence[EvalItem]) -> str:
    """MUSE's KnowMem few-shot block: "Question: q\nAnswer: a\n\n" per example."""
    return "".join(f"Question: {e.question}\nAnswer: {e.answer}\n\n" for e in examples)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _generation_metrics(model, tokenizer, scored: ScoredSplit, items, *, name: str, max_new_tokens: int,
                        verbmem_prefix_tokens: int, verbmem_max_new_tokens: int, stop_strings: Sequence[str],
                        batch_size: int, progress: bool, conv: Convention, fmt: PromptFormat,
                        shots: str) -> tuple[dict[str, list[float]], list[dict[str, str]]]:
    """Per-item QA ROUGE-L (F1, recall) and VerbMem of one split, plus a few examples."""
    qa = [(e, it) for e, it in zip(scored.encoded, items, strict=True) if it.is_qa]
    out: dict[str, list[float]] = {"rouge": [], "recall": [], "verbmem": []}
    examples: list[dict[str, str]] = []
    stem = conv.rouge_stemmer
    if qa:
        prompts = [e.ids[: e.target_start] if not shots else
                   fmt.prompt_ids(tokenizer, it.question, shots=shots) for e, it in qa]
        gens = greedy_generate(model, tokenizer, prompts, max_new_tokens,
                               batch_size=batch_size, progress=progress, desc=f"{name}: QA answers")
        for (_, it), g in zip(qa, gens, strict=True):
            pred = cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), stop_strings).strip()
            out["rouge"].append(rouge_l(pred, it.answer, stemmer=stem))
            out["recall"].append(rouge_l_recall(pred, it.answer, stemmer=stem))
            if len(examples) < N_EXAMPLES:
                examples.append({"question": it.question, "answer": it.answer, "generated": pred})
    pairs = verbmem_pairs(tokenizer, items, verbmem_prefix_tokens, verbmem_max_new_tokens)
    if pairs:
        limits = ([verbmem_max_new_tokens] * len(pairs) if conv.verbmem_new_tokens == "fixed"
                  else [len(t) for _, t in pairs])
        gens = greedy_generate(model, tokenizer, [p for p, _ in pairs], limits,
                               batch_size=batch_size, progress=progress, desc=f"{name}: VerbMem")
        for (prefix, truth), g in zip(pairs, gens, strict=True):
            truth_text, pred = _decode(tokenizer, truth), _decode(tokenizer, g)
            out["verbmem"].append(rouge_l(pred, truth_text, stemmer=stem))
            if len(examples) < 2 * N_EXAMPLES:
                examples.append({"prefix": _decode(tokenizer, prefix), "continuation": truth_text, "generated": pred})
    return out, examples


def mia_scores(scored: ScoredSplit, items: Sequence[EvalItem], conv: Convention, ratio: float,
               fmt: PromptFormat) -> list[dict[str, float]]:
    """Per-item attack scores. A QA item is scored on its whole text (every token after the first,
    `mia_tokens="all"`, MUSE) or on its answer tokens only (`"answer"`, open-unlearning; ZLib then
    compresses the answer text, as open-unlearning's target text); a text item always on all its tokens."""
    out = []
    for s, e, it in zip(scored.items, scored.encoded, items, strict=True):
        if it.is_qa and conv.mia_tokens == "answer":
            o = s.target_offset
            out.append(text_scores(s.logp[o:], s.mu[o:], s.sigma[o:], it.answer, ratio,
                                   conv.min_k_rounding))
        else:
            out.append(text_scores(s.logp, s.mu, s.sigma, e.text, ratio, conv.min_k_rounding))
    return out


def reference_mia_aucs(reference_model: nn.Module, tokenizer, forget: ItemsLike, holdout: ItemsLike, *,
                       convention: str | Convention = "muse", prompt_format: PromptFormat | None = None,
                       min_k_ratio: float = MIN_K_RATIO, batch_size: int = 16,
                       progress: bool = False) -> dict[str, float]:
    """MIA AUCs (our orientation) of a reference model (the model retrained without the forget set)
    on the same forget / holdout data: the `reference_auc` that PrivLeak compares against."""
    conv, fmt = get_convention(convention), prompt_format or PromptFormat()
    fi, hi = as_items(forget, "forget"), as_items(holdout, "holdout")
    sf = score_encoded(reference_model, tokenizer, encode_items(tokenizer, fi, fmt), batch_size=batch_size,
                       progress=progress, desc="reference: forget")
    sh = score_encoded(reference_model, tokenizer, encode_items(tokenizer, hi, fmt), batch_size=batch_size,
                       progress=progress, desc="reference: holdout")
    return mia_result(mia_scores(sf, fi, conv, min_k_ratio, fmt), mia_scores(sh, hi, conv, min_k_ratio, fmt),
                      ratio=min_k_ratio, rounding=conv.min_k_rounding, tokens=conv.mia_tokens).auc


def as_model(ref: nn.Module | str, like: nn.Module) -> nn.Module:
    """A reference model given as a module, or loaded (local files only) from a directory onto `like`'s device."""
    if isinstance(ref, nn.Module):
        return ref
    from pathlib import Path

    from moe_unlearn.eval.scoring import model_device
    from moe_unlearn.loading import load_model

    if not Path(ref).is_dir():
        raise BadInputError(f"reference model directory {ref} does not exist")
    m = load_model(ref)  # local files only, no code from the folder; BadInputError if it does not load
    return m.to(model_device(like)).eval()


def _check_lengths(model: nn.Module, batch_size: int, generate: bool, max_new_tokens: int,
                   verbmem_max_new_tokens: int, verbmem_prefix_tokens: int) -> None:
    """The batch size and, when decoding, the generation lengths (bounded by the model's positions), before
    any work."""
    check_int("batch_size", batch_size, low=1, high=MAX_ITEMS)
    if generate:
        positions = config_positions(getattr(model, "config", None))
        check_generation_length("max_new_tokens", max_new_tokens, positions=positions, low=0)
        check_generation_length("verbmem_max_new_tokens", verbmem_max_new_tokens, positions=positions)
        check_generation_length("verbmem_prefix_tokens", verbmem_prefix_tokens, positions=positions)


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    forget: ItemsLike | None = None,
    retain: ItemsLike | None = None,
    holdout: ItemsLike | None = None,
    extra_splits: Mapping[str, ItemsLike] | None = None,
    mcq: ItemsLike | None = None,
    completion: ItemsLike | None = None,
    original: nn.Module | None = None,
    original_routing: Mapping[str, RoutingRecording] | None = None,
    target: Sequence[int] | None = None,
    reference_auc: float | str | Mapping[str, float] | None = None,
    reference_model: nn.Module | str | None = None,
    convention: str | Convention = "muse",
    knowmem_icl: ItemsLike | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    generate: bool = True,
    verbmem_prefix_tokens: int = 32,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    stop_strings: Sequence[str] | None = None,
    prompt_format: PromptFormat | None = None,
    mcq_template: str = MCQ_TEMPLATE,
    mcq_protocols: Sequence[str] = ("letters", "cloze"),
    lm_eval_tasks: Sequence[str] | None = None,
    lm_eval_include_path: str | None = None,
    lm_eval_limit: int | None = None,
    min_k_ratio: float = MIN_K_RATIO,
    replay: str | None = None,
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
      high = forget still recognisable; MUSE's orientation in `auc_muse`) and MUSE's PrivLeak against
      `reference_model` (a model or a model directory, e.g. the model retrained without the forget
      set: its AUCs are measured here on the same data) or `reference_auc` (float, {attack: auc} in
      our orientation, or "muse-news"/"muse-books" for MUSE's published retrained AUCs) -- see eval.mia;
    - convention ("muse" default, "open-unlearning", or a Convention): which tokens MIA scores for
      QA items, Min-K% rounding, VerbMem length, ROUGE stemming, KnowMem stops -- see
      eval.conventions; `knowmem_icl` (QA records) gives MUSE's few-shot KnowMem prompt;
      `stop_strings` None = the convention's KnowMem stops;
    - mcq: a path or list of {question, choices, answer} -> accuracy by option log-likelihood, for
      each of `mcq_protocols`: "letters" (lm-eval's WMDP/MMLU: choices listed A-D, the letter
      scored; report.mcq_letters) and "cloze" (each choice's text scored; report.mcq);
    - lm_eval_tasks: task names run by lm-evaluation-harness (`pip install moe-unlearn[eval]`) on
      this in-memory model (patches applied), tasks found in `lm_eval_include_path` (a folder of
      task YAML files; see eval.lm_eval_bridge) -> report.lm_eval;
    - routing vs the original model, for every split: `original` (a second model object, recorded
      here) or `original_routing` ({split name: RoutingRecording} from `record_routing` with the
      same tokenizer and prompt_format, e.g. recorded before applying a patch); `target` =
      (layer, expert) adds that expert's gate mass -- see eval.routing.
    - replay ("original" | "current", needs forget and the original routing): the forget split
      scored again with the original model's top-K experts forced at every MoE layer (with its
      gate values, or the current router's) -> split "forget_replay" (see eval.replay). Forget EM
      coming back under replay = the forgetting was done by the router, not by erasing.
    - completion: statements cut before their answer ({question: prefix, answer} records, e.g.
      from a paraphrase the unlearning never saw) -> split "completion", scored on the answer
      tokens of prefix + " " + answer with no QA template (a format probe).
    The model is put in eval mode during the call and restored afterwards.
    """
    if original is not None and original_routing is not None:
        raise BadInputError("give either original (a model) or original_routing (recordings), not both")
    if reference_model is not None and reference_auc is not None:
        raise BadInputError("give either reference_model or reference_auc for PrivLeak, not both")
    unknown_protocols = set(mcq_protocols) - {"letters", "cloze"}
    if unknown_protocols:
        raise BadInputError(f"unknown mcq protocol(s) {sorted(unknown_protocols)}; choose from letters, cloze")
    _check_lengths(model, batch_size, generate, max_new_tokens, verbmem_max_new_tokens, verbmem_prefix_tokens)
    conv = get_convention(convention)
    stops = tuple(conv.knowmem_stops if stop_strings is None else stop_strings)
    fmt = prompt_format or PromptFormat()
    raw: dict[str, ItemsLike] = {}
    for name, data in (("forget", forget), ("retain", retain), ("holdout", holdout)):
        if data is not None:
            raw[name] = data
    for name, data in (extra_splits or {}).items():
        if name in raw:
            raise BadInputError(f"extra split {name!r} clashes with a built-in split name; rename it")
        raw[name] = data
    if not raw and mcq is None and completion is None:
        raise BadInputError("nothing to evaluate: give at least one of forget, retain, holdout, extra_splits, mcq, "
                            "completion")
    if replay is not None:
        from moe_unlearn.eval.replay import REPLAY_GATES

        if replay not in REPLAY_GATES:
            raise BadInputError(f"replay must be one of {', '.join(REPLAY_GATES)} or None, got {replay!r}")
        if forget is None or (original is None and "forget" not in (original_routing or {})):
            raise BadInputError("replay needs the forget split and the original routing on it (original=... or "
                                "original_routing={'forget': ...})")
    for name in ("forget_replay", "completion"):
        if name in raw:
            raise BadInputError(f"extra split {name!r} clashes with a built-in split name; rename it")
    if original_routing is not None:
        unknown = set(original_routing) - set(raw)
        if unknown:
            raise BadInputError(f"original_routing has splits {sorted(unknown)} that were not given for evaluation")
    items = {name: as_items(data, name) for name, data in raw.items()}  # validate all input before any work
    encoded = {name: encode_items(tokenizer, its, fmt) for name, its in items.items()}
    shots = ""
    if knowmem_icl is not None and conv.knowmem_few_shot:
        icl = as_items(knowmem_icl, "knowmem_icl")
        if not all(it.is_qa for it in icl):
            raise BadInputError("knowmem_icl: every few-shot example needs a question and an answer")
        shots = few_shot_prefix(icl)
    if reference_model is not None and not ("forget" in items and "holdout" in items):
        raise BadInputError("reference_model is for PrivLeak, which needs both forget and holdout")
    if lm_eval_tasks:
        from moe_unlearn.eval.lm_eval_bridge import require_lm_eval

        require_lm_eval()
    completion_fmt = PromptFormat(template="{question}", answer_prefix=" ", max_length=fmt.max_length)
    completion_items = as_items(completion, "completion") if completion is not None else None
    if completion_items is not None and not all(it.is_qa for it in completion_items):
        raise BadInputError("completion records need {question: prefix, answer}, not plain texts")
    completion_enc = encode_items(tokenizer, completion_items, completion_fmt) if completion_items else None

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
                stop_strings=stops, batch_size=batch_size, progress=progress, conv=conv, fmt=fmt, shots=shots)
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
            if name == "forget" and replay is not None:
                from moe_unlearn.eval.replay import score_replayed

                rep = score_replayed(model, tokenizer, enc, orig, gates=replay, batch_size=batch_size,
                                     progress=progress)
                report.splits["forget_replay"] = split_metrics(rep.items, [it.is_qa for it in items[name]])
    if completion_enc is not None:
        comp = score_encoded(model, tokenizer, completion_enc, batch_size=batch_size, progress=progress,
                             desc="completion: scoring")
        report.splits["completion"] = split_metrics(comp.items, [True] * len(completion_enc))

    if "forget" in scored and "holdout" in scored:
        ref = reference_auc
        if reference_model is not None:
            ref_model = as_model(reference_model, model)
            ref = reference_mia_aucs(ref_model, tokenizer, items["forget"], items["holdout"], convention=conv,
                                     prompt_format=fmt, min_k_ratio=min_k_ratio, batch_size=batch_size,
                                     progress=progress)
        report.mia = mia_result(mia_scores(scored["forget"], items["forget"], conv, min_k_ratio, fmt),
                                mia_scores(scored["holdout"], items["holdout"], conv, min_k_ratio, fmt),
                                ref, min_k_ratio, conv.min_k_rounding, conv.mia_tokens)
    if mcq is not None:
        if "cloze" in mcq_protocols:
            report.mcq = mcq_accuracy(model, tokenizer, mcq, template=mcq_template, batch_size=batch_size,
                                      progress=progress, max_length=fmt.max_length, protocol="cloze")
        if "letters" in mcq_protocols:
            report.mcq_letters = mcq_accuracy(model, tokenizer, mcq, batch_size=batch_size, progress=progress,
                                              max_length=fmt.max_length, protocol="letters")
    if lm_eval_tasks:
        from moe_unlearn.eval.lm_eval_bridge import run_lm_eval

        report.lm_eval = run_lm_eval(model, tokenizer, list(lm_eval_tasks), include_path=lm_eval_include_path,
                                     batch_size=batch_size, limit=lm_eval_limit)
    report.meta = {
        "model": type(model).__name__,
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "seconds": round(time.perf_counter() - t0, 3),
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "generate": generate,
        "verbmem_prefix_tokens": verbmem_prefix_tokens, "verbmem_max_new_tokens": verbmem_max_new_tokens,
        "prompt_template": fmt.template, "chat_template": fmt.chat, "answer_prefix": fmt.answer_prefix, "min_k_ratio": min_k_ratio,
        "convention": dataclasses.asdict(conv), "knowmem_shots": shots.count("Question: "),
        "stop_strings": list(stops),
        "target": list(target) if target is not None else None, "replay_gates": replay,
    }
    return report
