"""Computed GPU memory of uoe vs full unlearning for large MoE checkpoints (README "Large models").

No weights are needed: the sizes come from each model's published config. Bytes, for a model of
P parameters loaded in bf16 whose target layer has E routed experts of n_e parameters each, and
n_t = n_e + router parameters trained (uoe):
  weights          2 P
  uoe training     16 n_t (fp32 master 4 + fp32 gradient 4 + Adam moments 8)
                   + 2 E n_e (the fused bf16 gradient of the target layer's expert tensors, freed
                     as soon as the slice is moved into the master)
  full training    16 P (fp32 masters, gradients, Adam moments) + the bf16 weights 2 P
Activations come on top of both (they depend on batch x length; gradient checkpointing cuts the
part of the layers above the target).

    python benchmarks/large_model_memory.py      # prints the markdown table and writes JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (name, total params, hidden, expert intermediate, routed experts per layer, router rows)
MODELS = [
    ("OLMoE-1B-7B", 6.92e9, 2048, 1024, 64, 64),
    ("Qwen1.5-MoE-A2.7B", 14.3e9, 2048, 1408, 60, 61),  # + the shared-expert gate row
    ("DeepSeek-V2-Lite", 15.7e9, 2048, 1408, 64, 64),
    ("Mixtral-8x7B", 46.7e9, 4096, 14336, 8, 8),
]
GB = 1e9


def estimate(params: float, hidden: int, inter: int, experts: int, router_rows: int) -> dict[str, float]:
    n_e = 3 * hidden * inter  # gate, up, down
    n_t = n_e + router_rows * hidden
    weights = 2 * params
    uoe = weights + 16 * n_t + 2 * experts * n_e
    full = weights + 16 * params
    return {"weights_gb": weights / GB, "trained_params_uoe": n_t, "uoe_gb": uoe / GB,
            "fused_grad_gb": 2 * experts * n_e / GB, "full_gb": full / GB}


def main() -> None:
    rows = {name: estimate(*vals) for name, *vals in MODELS}
    print("| model | bf16 weights | uoe: trained params | uoe: total | of which fused gradient | full: total |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['weights_gb']:.1f} GB | {r['trained_params_uoe'] / 1e6:.1f} M | {r['uoe_gb']:.1f} GB "
              f"| {r['fused_grad_gb']:.2f} GB | {r['full_gb']:.0f} GB |")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("large_model_memory.json")
    out.write_text(json.dumps({"device": "computed (no device)", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
