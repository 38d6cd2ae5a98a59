"""`moe-unlearn inspect MODEL_DIR`: the MoE layers of a local model, as a table.

The config is read with `from_pretrained` from the local directory and the model is built
on the meta device, so inspecting a 100B-parameter checkpoint takes seconds and no memory;
--load-weights loads the real weights instead (which also checks that they load).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moe_unlearn.commands import add_model_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="print the MoE layers of a local model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="local model directory (save_pretrained layout) or a hub id in the local HF cache")
    add_model_args(p)  # --device / --device-map apply with --load-weights (the meta build needs no device)
    p.add_argument("--load-weights", action="store_true",
                   help="load the weights with from_pretrained instead of building the model on the meta device")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return p


def load_for_inspection(model_dir: str | Path, *, trust_remote_code: bool = False, load_weights: bool = False,
                        dtype: str | None = None):
    """The causal LM of a local directory: on the meta device (structure only) or with its weights."""
    from moe_unlearn.loading import load_model

    return load_model(model_dir, trust_remote_code=trust_remote_code, meta=not load_weights, dtype=dtype)


def _shared(layer: dict[str, Any]) -> str:
    return f"yes ({layer['shared_expert_params']:,})" if layer["shared_experts"] else "-"


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable report of `model_summary`."""
    dense = summary["dense_layer_indices"]
    routed_pct = 100.0 * summary["routed_expert_params"] / summary["total_params"] if summary["total_params"] else 0
    head = [
        f"{summary['model_class']}  family={summary['family']}  routing={summary['routing_rule']}  "
        f"scores={summary['score_kind']}",
        f"parameters: {summary['total_params']:,}; decoder layers: {summary['num_decoder_layers']}; "
        f"MoE layers: {len(summary['moe_layer_indices'])}; dense layers: {dense if dense else 'none'}",
        f"routed experts: {summary['num_experts']} per layer, top-{summary['top_k']}; "
        f"{summary['routed_expert_params']:,} parameters in routed experts ({routed_pct:.2f}% of the model)",
        "",
    ]
    cols = ["layer", "path", "experts", "top-K", "shared experts", "params/expert", "% of model"]
    rows = [[str(d["layer"]), d["path"], str(d["experts"]), str(d["top_k"]), _shared(d),
             f"{d['params_per_expert']:,}", f"{d['expert_pct_of_model']:.4f}%"] for d in summary["layers"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    left = {1, 4}  # text columns

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join(head + [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run(args: argparse.Namespace) -> int:
    from moe_unlearn.arch import model_summary
    from moe_unlearn.commands import load_from_args

    if args.load_weights:
        args.model = args.model_dir
        model, _ = load_from_args(args, tokenizer=False)
    else:
        from moe_unlearn.loading import parse_device_map, resolve_device

        resolve_device(args.device)  # flags are checked either way, though the meta build ignores them
        parse_device_map(args.device_map)
        model = load_for_inspection(args.model_dir, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    summary = model_summary(model)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0
