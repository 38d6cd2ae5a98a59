"""Attribution overhead: attribute_experts vs a plain forward pass over the same batches.

Both run the same pre-tokenized batches through the same decoder call (no LM head, no
KV cache, position ids from the mask), interleaved round by round so machine load hits
both alike; the median over rounds is reported. The goal is an overhead of at
most 5% over the plain forward. The full causal-LM forward (with LM head) is timed too,
as what a user would otherwise run.

    .venv/bin/python benchmarks/bench_attribution.py            # ~100K tokens, CPU
    .venv/bin/python benchmarks/bench_attribution.py --device cuda --family deepseek_v3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_unlearn import atomic
from moe_unlearn.attribution import attribute_experts
from moe_unlearn.data import TokenizedBatches
from moe_unlearn.testing import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_batches(num_texts: int, length: int, batch_size: int, vocab: int, seed: int) -> TokenizedBatches:
    """Random token sequences of varied length (so batches carry padding), no tokenizer needed."""
    rng = random.Random(seed)
    seqs = [torch.tensor([rng.randrange(vocab) for _ in range(rng.randrange(length // 2, length + 1))])
            for _ in range(num_texts)]
    return TokenizedBatches(sequences=seqs, batch_size=batch_size, max_length=length, padding_side="right",
                            pad_token_id=0, num_truncated=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_forward(model, batches: TokenizedBatches, device: torch.device, *, lm_head: bool) -> None:
    runner = model if lm_head else model.base_model
    for batch in batches:
        mask = batch["attention_mask"].to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        runner(input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=position_ids,
               use_cache=False)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_moe")
    p.add_argument("--tokens", type=int, default=100_000, help="approximate number of tokens")
    p.add_argument("--length", type=int, default=256, help="max sequence length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy on a shared box)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size (default: the tiny test model's 32); also scales heads/experts' width")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/attribution_<dev>.json)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {}
    if args.hidden:  # a larger "tiny" model: same layer count / experts, wider
        overrides = dict(hidden_size=args.hidden, head_dim=args.hidden // 4, intermediate_size=2 * args.hidden,
                         moe_intermediate_size=args.hidden // 2)
    model = tiny_model(args.family, **overrides).to(device)
    avg_len = 3 * args.length // 4
    batches = synthetic_batches(max(1, args.tokens // avg_len), args.length, args.batch_size,
                                model.config.vocab_size, seed=0)

    run_attr = lambda: attribute_experts(model, batches, progress=False, device=device)
    cases = {
        "forward_decoder": lambda: plain_forward(model, batches, device, lm_head=False),
        "attribution": run_attr,
        "forward_causal_lm": lambda: plain_forward(model, batches, device, lm_head=True),
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # alternate to cancel drift
        for name in order:
            times[name].append(timed(cases[name], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    attr = run_attr()
    result = {
        "benchmark": "attribution_overhead",
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "family": args.family,
        "model": {"hidden": model.config.hidden_size, "moe_layers": len(attr.layers), "experts": attr.num_experts,
                  "top_k": attr.top_k[0]},
        "tokens": batches.num_tokens,
        "sequences": batches.num_texts,
        "batches": len(batches),
        "batch_size": args.batch_size,
        "max_length": args.length,
        "rounds": args.rounds,
        "median_s": med,
        "all_s": times,
        "overhead_vs_decoder_forward": med["attribution"] / med["forward_decoder"] - 1.0,
        "ratio_vs_causal_lm_forward": med["attribution"] / med["forward_causal_lm"],
        "tokens_per_s_attribution": batches.num_tokens / med["attribution"],
        "goal": "overhead_vs_decoder_forward <= 0.05",
    }
    out = Path(args.out) if args.out else RESULTS / f"attribution_{args.family}_h{model.config.hidden_size}_{device.type}.json"
    atomic.write_json(out, result, indent=1)
    print(json.dumps({k: result[k] for k in ("device", "family", "tokens", "median_s",
                                              "overhead_vs_decoder_forward", "ratio_vs_causal_lm_forward")},
                     indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
