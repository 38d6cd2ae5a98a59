"""Greedy decoding in left-padded batches (the only padding side where new tokens line up)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.scoring import model_device, pad_token_id


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (either may have none)."""
    found: list[int] = []
    cfg = getattr(model, "generation_config", None)
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None)):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, int) and x not in found:
                found.append(x)
    return found


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int | Sequence[int], *, batch_size: int = 16, progress: bool = True,
                    desc: str = "generating") -> list[list[int]]:
    """Greedy continuation of each prompt (token ids). Returns only the new ids of each prompt,
    cut at the first EOS and at that prompt's own `max_new_tokens` (an int or one per prompt)."""
    from moe_unlearn.validate import MAX_ITEMS, check_generation_length, check_int, config_positions

    check_int("batch_size", batch_size, low=1, high=MAX_ITEMS)
    positions = config_positions(getattr(model, "config", None))
    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
              else list(max_new_tokens) if isinstance(max_new_tokens, Sequence) and not isinstance(max_new_tokens, str)
              else [max_new_tokens])
    limits = [check_generation_length("max_new_tokens", m, positions=positions, low=0) for m in limits]
    if len(limits) != len(prompts):
        raise BadInputError("max_new_tokens must be an int or one value per prompt")
    if any(len(p) == 0 for p in prompts):
        raise BadInputError("greedy_generate: every prompt needs at least one token")
    device, pad, stops = model_device(model), pad_token_id(tokenizer), eos_ids(model, tokenizer)
    # batches of similar length waste less compute on padding; results go back in the caller's order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            limit = max(limits[i] for i in rows)
            if limit <= 0:
                continue
            ids, mask = left_pad([prompts[i] for i in rows], pad, device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit, min_new_tokens=0,
                                 do_sample=False, num_beams=1, pad_token_id=pad,
                                 eos_token_id=stops or None)
            for i, seq in zip(rows, gen[:, ids.shape[1]:].cpu().tolist(), strict=True):
                seq = seq[: limits[i]]
                for pos, tok in enumerate(seq):
                    if tok in stops:
                        seq = seq[:pos]
                        break
                outputs[i] = seq
    finally:
        model.train(was_training)
    return outputs
