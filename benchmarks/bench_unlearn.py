"""uoe vs full unlearning on one tiny model and batch: step time and optimizer-state bytes.

Goals: uoe at least 2x faster per step and at least 10x less optimizer memory.
Step time = the training loop's wall time / steps, median over --repeats runs (reference values
are computed before the loop; the prefix cache is filled during the first step, which is counted). Writes benchmarks/results/unlearn_<family>_h<hidden>_<device>.json.

    .venv/bin/python benchmarks/bench_unlearn.py                 # CPU
    .venv/bin/python benchmarks/bench_unlearn.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from moe_unlearn.data import TokenizedBatches
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def batch(num_texts: int, length: int, vocab: int, seed: int) -> TokenizedBatches:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (length,), generator=g) for _ in range(num_texts)]
    return TokenizedBatches(sequences=seqs, batch_size=num_texts, max_length=length, padding_side="right",
                            pad_token_id=0, num_truncated=0)


def run(model_kw: dict, scope: str, target, forget, retain, *, steps: int, device: torch.device,
        prefix_cache: bool = True, repeats: int = 3) -> dict:
    times = []
    res = None
    for r in range(repeats):
        model = tiny_model(model_kw["family"], **model_kw["overrides"]).to(device)
        res = unlearn(model, forget, retain, method="npo", scope=scope, target=target, steps=steps, lr=1e-4,
                      progress=False, prefix_cache=prefix_cache, seed=r)
        times.append(res.history.wall_time / steps)
    return {"scope": scope, "target": res.targets, "prefix_cache": prefix_cache,
            "step_time_s": statistics.median(times), "step_times_s": times,
            "optimizer_state_bytes": res.optimizer_state_bytes, "trainable_params": res.trainable_params}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    overrides = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_experts=args.experts,
                     moe_intermediate_size=args.hidden // 2, intermediate_size=args.hidden * 2,
                     head_dim=args.hidden // 4, vocab_size=512)
    model_kw = {"family": args.family, "overrides": overrides}
    forget = batch(args.batch, args.seq, 512, 0)
    retain = batch(args.batch, args.seq, 512, 1)
    kw = dict(steps=args.steps, device=device, repeats=args.repeats)
    full = run(model_kw, "full", None, forget, retain, **kw)
    uoe_last = run(model_kw, "uoe", f"{args.layers - 1}:0", forget, retain, **kw)
    uoe_first = run(model_kw, "uoe", "0:0", forget, retain, **kw)
    uoe_nocache = run(model_kw, "uoe", f"{args.layers - 1}:0", forget, retain, prefix_cache=False, **kw)
    out = {
        "benchmark": "unlearn_step", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "python": sys.version.split()[0],
        "model": {"family": args.family, **overrides}, "batch": [args.batch, args.seq], "method": "npo",
        "steps": args.steps, "runs": [full, uoe_last, uoe_first, uoe_nocache],
        "speedup_uoe_last_layer": full["step_time_s"] / uoe_last["step_time_s"],
        "speedup_uoe_first_layer": full["step_time_s"] / uoe_first["step_time_s"],
        "speedup_uoe_last_layer_no_prefix_cache": full["step_time_s"] / uoe_nocache["step_time_s"],
        "optimizer_memory_ratio": full["optimizer_state_bytes"] / uoe_last["optimizer_state_bytes"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if device.type == "cuda" else "cpu"
    path = RESULTS / f"unlearn_{args.family}_h{args.hidden}_{dev}.json"
    path.write_text(json.dumps(out, indent=1))
    for r in out["runs"]:
        print(f"{r['scope']:5s} target={r['target']} cache={r['prefix_cache']}: {r['step_time_s'] * 1e3:.1f} ms/step, "
              f"optimizer state {r['optimizer_state_bytes']} B, trainable {r['trainable_params']}")
    print(f"speedup uoe(last layer) {out['speedup_uoe_last_layer']:.2f}x, uoe(first layer) "
          f"{out['speedup_uoe_first_layer']:.2f}x, no cache {out['speedup_uoe_last_layer_no_prefix_cache']:.2f}x; "
          f"optimizer memory {out['optimizer_memory_ratio']:.1f}x less -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
