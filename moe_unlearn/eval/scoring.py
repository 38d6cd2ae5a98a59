"""One teacher-forced forward pass per batch that yields everything the metrics need.

For every item: the log-prob of each real next token, whether it was the argmax, and
mu / sigma of log p under the model's full next-token distribution (for Min-K%++),
and optionally the routing of every real token (top-K experts and their gate values).
Batches are right-padded so that real tokens keep their unpadded positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.eval.items import EvalItem


@dataclass
class PromptFormat:
    """How a QA item becomes tokens: prompt = template.format(question=q) (special tokens added),
    target = answer_prefix + answer (no special tokens); ids = prompt ids + target ids.
    Encoding the two parts separately keeps the answer's token boundary exact.
    The default matches `moe_unlearn.data.DEFAULT_TEMPLATE` ("Question: {question}\nAnswer: {answer}"),
    the text the unlearning and training code builds from the same records."""

    template: str = "Question: {question}\nAnswer:"
    answer_prefix: str = " "
    max_length: int = 512
    chat: bool = False  # the tokenizer's chat template instead (moe_unlearn.data.chat_parts), as in training

    @classmethod
    def from_template(cls, text_template: str, max_length: int = 512) -> PromptFormat:
        """From a full-text template with {question} and {answer} (as in moe_unlearn.data); whitespace
        before {answer} moves into answer_prefix, so BPE tokenizers see " answer" as they did in training.
        "chat" (moe_unlearn.data.CHAT_TEMPLATE): the tokenizer's chat template."""
        from moe_unlearn.data import CHAT_TEMPLATE

        if text_template == CHAT_TEMPLATE:
            return cls(template="{question}", answer_prefix="", max_length=max_length, chat=True)
        if "{answer}" not in text_template or "{question}" not in text_template:
            raise BadInputError(f"template {text_template!r} needs both {{question}} and {{answer}}")
        head, tail = text_template.split("{answer}", 1)
        if tail.strip():
            raise BadInputError(f"template {text_template!r}: {{answer}} must come last")
        stripped = head.rstrip()
        return cls(template=stripped, answer_prefix=head[len(stripped):], max_length=max_length)


    def prompt_ids(self, tokenizer, question: str, *, shots: str = "", limit: int | None = None) -> list[int]:
        """The prompt tokens of a question (`shots` before it: a few-shot block)."""
        if self.chat:
            from moe_unlearn.data import chat_parts

            return encode(tokenizer, chat_parts(tokenizer, shots + question)[0], False, limit)
        return encode(tokenizer, shots + self.template.format(question=question), True, limit)

    def qa_ids(self, tokenizer, question: str, answer: str) -> tuple[list[int], list[int], str]:
        """(prompt ids, target ids, full text) of a QA item: the same tokens training builds from the
        record (moe_unlearn.data.tokenize_batches) under the same template."""
        if self.chat:
            from moe_unlearn.data import chat_parts

            prompt, target = chat_parts(tokenizer, question, answer)
            return (encode(tokenizer, prompt, False, self.max_length), encode(tokenizer, target, False,
                                                                                self.max_length), prompt + target)
        prompt = self.template.format(question=question)
        return (encode(tokenizer, prompt, True, self.max_length),
                encode(tokenizer, self.answer_prefix + answer, False, self.max_length),
                prompt + self.answer_prefix + answer)


@dataclass
class EncodedItem:
    """ids: all tokens. target_start: index in ids of the first scored token (QA: first answer token;
    text: 1, the first token with context). text: the full string (for ZLib)."""

    ids: list[int]
    target_start: int
    text: str
    is_qa: bool


def encode(tokenizer, text: str, special: bool, limit: int | None = None) -> list[int]:
    """Token ids of `text`; with `limit`, a very long text is cut before tokenizing (see data.encode_capped)."""
    if limit is not None:
        from moe_unlearn.data import encode_capped

        return encode_capped(tokenizer, [text], limit, add_special_tokens=special)[0]
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_items(tokenizer, items: Sequence[EvalItem], fmt: PromptFormat | None = None) -> list[EncodedItem]:
    fmt = fmt or PromptFormat()
    out = []
    for i, item in enumerate(items):
        if item.is_qa:
            p_ids, a_ids, text = fmt.qa_ids(tokenizer, item.question, item.answer)
            if not p_ids or not a_ids:
                raise DataError(f"item {i}: the question or the answer tokenizes to nothing ({item!r})")
            ids, start = p_ids + a_ids, len(p_ids)
        else:
            ids, start, text = encode(tokenizer, item.text, True, fmt.max_length), 1, item.text
            if len(ids) < 2:
                raise DataError(f"item {i}: text {item.text!r} has fewer than 2 tokens; nothing to score")
        if len(ids) > fmt.max_length:
            if start >= fmt.max_length:
                raise DataError(f"item {i}: the prompt is longer than max_length={fmt.max_length}; "
                                "raise max_length or shorten the question")
            ids = ids[: fmt.max_length]
        out.append(EncodedItem(ids, start, text, item.is_qa))
    return out


def fingerprint(encoded: Sequence[EncodedItem]) -> str:
    """A hash of the token ids, to check that two routing recordings cover the same tokens."""
    h = hashlib.sha1()
    for e in encoded:
        h.update(torch.tensor(e.ids, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_token_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


@dataclass
class ItemScores:
    """Per-position statistics of one item over positions 1..n-1 (the tokens that have context).
    Arrays are CPU fp32 (correct: bool). `target_offset` = target_start - 1 indexes the first
    scored (answer) position in these arrays."""

    logp: torch.Tensor
    correct: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    target_offset: int

    @property
    def target_logp(self) -> torch.Tensor:
        return self.logp[self.target_offset:]

    @property
    def target_correct(self) -> torch.Tensor:
        return self.correct[self.target_offset:]


@dataclass
class RoutingRecording:
    """Routing of every real token of a dataset through each MoE layer, tokens in item order.

    topk_idx[l]:   [N, K] int64, the experts each token is sent to in layer l.
    topk_score[l]: [N, K] fp32, the full-distribution score of those experts (the gate values
                   g_{i,t} of the SEUF affinity score; 0 for the other experts).
    num_experts[l]: routed experts of layer l. tokens_per_item: real tokens of each item.
    fingerprint: hash of the token ids; recordings are comparable only if fingerprints match.
    topk_weight[l]: [N, K] fp32, the weights the block applied to those experts (after any
                   renormalisation), for routing replay (moe_unlearn.eval.replay); None in recordings
                   made before it was kept.
    Record once with `record_routing` and pass as `original_routing` to reuse it.
    """

    topk_idx: dict[int, torch.Tensor]
    topk_score: dict[int, torch.Tensor]
    num_experts: dict[int, int]
    tokens_per_item: list[int]
    fingerprint: str
    topk_weight: dict[int, torch.Tensor] | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.topk_idx)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.tokens_per_item))


@dataclass
class ScoredSplit:
    items: list[ItemScores]
    routing: RoutingRecording | None = None
    encoded: list[EncodedItem] = field(default_factory=list)


def _batches(n: int, batch_size: int) -> list[range]:
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def next_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logits [..., V] predicting targets [...] -> (log p(target), argmax == target, mu, sigma),
    with mu = E_p[log p] and sigma^2 = Var_p[log p] over the vocabulary (Min-K%++).

    The variance is computed centred, sum_z p_z (logit_z - E_p[logit])^2 (log p and the logit differ
    by a constant, so their variances are equal). The textbook E[x^2] - E[x]^2 cancels
    catastrophically in fp32 on near-uniform distributions (what max-entropy unlearning produces):
    at a logit spread of 0.0024 it is off by orders of magnitude."""
    logits32 = logits.float()
    logprobs = torch.log_softmax(logits32, dim=-1)
    probs = logprobs.exp()
    tok = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    correct = logits.argmax(-1) == targets
    mu = (probs * logprobs).sum(-1)
    centred = logits32 - (probs * logits32).sum(-1, keepdim=True)
    var = (probs * centred.square()).sum(-1)
    return tok, correct, mu, var.clamp_min(1e-30).sqrt()


@torch.no_grad()
def score_encoded(model: nn.Module, tokenizer, encoded: Sequence[EncodedItem], *, batch_size: int = 16,
                  record_routing: bool = False, progress: bool = False, desc: str = "scoring") -> ScoredSplit:
    """Teacher-forced pass over `encoded`; per-item scores and (optionally) the routing recording."""
    from moe_unlearn.arch import RoutingCapture, find_moe_layers
    from moe_unlearn.validate import check_token_ids

    check_token_ids(model, [e.ids for e in encoded], what=desc)  # an IndexError / device assert otherwise
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    layers = find_moe_layers(model) if record_routing else []
    idx_parts: dict[int, list[torch.Tensor]] = {lay.layer_idx: [] for lay in layers}
    score_parts: dict[int, list[torch.Tensor]] = {lay.layer_idx: [] for lay in layers}
    weight_parts: dict[int, list[torch.Tensor]] = {lay.layer_idx: [] for lay in layers}
    results: list[ItemScores] = []
    was_training = model.training
    model.eval()
    try:
        for rng in tqdm(_batches(len(encoded), batch_size), desc=desc, disable=not progress, leave=False):
            batch = [encoded[i] for i in rng]
            ids, mask = right_pad([e.ids for e in batch], pad, device)
            if layers:
                with RoutingCapture(model, layers) as cap:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                rec = cap.records[0]
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            tok, correct, mu, sigma = (t.cpu() for t in next_token_stats(logits[:, :-1], ids[:, 1:].to(logits.device)))
            for b, e in enumerate(batch):
                n = len(e.ids) - 1
                results.append(ItemScores(tok[b, :n], correct[b, :n], mu[b, :n], sigma[b, :n], e.target_start - 1))
            width = ids.shape[1]
            for lay in layers:
                r = rec.layers[lay.layer_idx]
                routing = r.routing(lay)
                gate = routing.scores.gather(1, routing.topk_idx)
                k = routing.topk_idx.shape[1]
                idx3 = routing.topk_idx.reshape(len(batch), width, k).cpu()
                gate3 = gate.reshape(len(batch), width, k).cpu()
                weight3 = routing.topk_weight.reshape(len(batch), width, k).cpu()
                for b, e in enumerate(batch):
                    idx_parts[lay.layer_idx].append(idx3[b, : len(e.ids)])
                    score_parts[lay.layer_idx].append(gate3[b, : len(e.ids)])
                    weight_parts[lay.layer_idx].append(weight3[b, : len(e.ids)])
    finally:
        model.train(was_training)
    routing_rec = None
    if layers:
        routing_rec = RoutingRecording(
            topk_idx={i: torch.cat(p) for i, p in idx_parts.items()},
            topk_score={i: torch.cat(p).float() for i, p in score_parts.items()},
            num_experts={lay.layer_idx: lay.num_experts for lay in layers},
            tokens_per_item=[len(e.ids) for e in encoded],
            fingerprint=fingerprint(encoded),
            topk_weight={i: torch.cat(p).float() for i, p in weight_parts.items()},
        )
    return ScoredSplit(results, routing_rec, list(encoded))
