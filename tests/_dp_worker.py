"""One rank of the data-parallel test (tests/test_distributed.py runs it under torchrun, and in
one process with grad_accum = world * grad_accum for the reference)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.distributed import init_from_env, world
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn

FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(6 + i % 3)) for i in range(8)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(7)) for i in range(8)]


def main(out: str, grad_accum: int, adapter: str | None = None) -> None:
    init_from_env("cpu")
    rank, _ = world()
    model = tiny_model("qwen3_moe")
    res = unlearn(model, FORGET, RETAIN, tokenizer=word_tokenizer(), method="graddiff", scope="uoe", target=None,
                  steps=2, lr=1e-2, batch_size=2, grad_accum=grad_accum, max_length=12, progress=False,
                  out_dir=out, adapter=adapter, adapter_rank=2)
    from moe_unlearn.attribution import attribute_experts

    att = attribute_experts(model, FORGET, tokenizer=word_tokenizer(), batch_size=2, max_length=12,
                            keep_token_routing=False, progress=False, stability=True)  # split over the ranks
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"att.{k}": getattr(att, k) for k in ("affinity", "frequency", "mean_score", "counts")})
    state["att.tokens"] = torch.tensor([att.num_tokens, att.num_sequences])
    state["att.stability"] = torch.tensor(att.stability)
    torch.save(state, Path(out).with_name(f"{Path(out).name}.rank{rank}.pt"))
    if rank == 0:
        Path(out).with_name(f"{Path(out).name}.history.json").write_text(json.dumps(res.history.terms))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
