"""moe-unlearn: unlearning for Mixture-of-Experts LLMs.

The core path reads as a short sequence of calls:

    layers = find_moe_layers(model)                      # what the model's MoE blocks are
    attr = attribute_experts(model, forget, tokenizer=tok)  # which experts the forget data uses
    result = unlearn(model, forget, retain, method="npo", scope="uoe", tokenizer=tok)
    report = evaluate(model, ...)                        # forget/retain quality, MIA, routing shift

Names are imported lazily so that `import moe_unlearn` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # architecture layer
    "find_moe_layers": "moe_unlearn.arch",
    "MoELayer": "moe_unlearn.arch",
    "Routing": "moe_unlearn.arch",
    "ExpertSlice": "moe_unlearn.arch",
    "RoutingCapture": "moe_unlearn.arch",
    "ExpertTarget": "moe_unlearn.arch",
    "model_summary": "moe_unlearn.arch",
    "SUPPORTED_FAMILIES": "moe_unlearn.arch",
    # loading (local folders only; a folder's own code runs only with trust_remote_code=True)
    "load_model": "moe_unlearn.loading",
    "load_tokenizer": "moe_unlearn.loading",
    # errors
    "MoEUnlearnError": "moe_unlearn.errors",
    "NotAnMoEModel": "moe_unlearn.errors",
    "BadInputError": "moe_unlearn.errors",
    # attribution
    "attribute_experts": "moe_unlearn.attribution",
    "Attribution": "moe_unlearn.attribution",
    "select_targets": "moe_unlearn.attribution",
    "PremiseWarning": "moe_unlearn.attribution",
    # data
    "load_texts": "moe_unlearn.data",
    "load_examples": "moe_unlearn.data",
    "load_records": "moe_unlearn.data",
    "tokenize_batches": "moe_unlearn.data",
    # unlearning
    "unlearn": "moe_unlearn.unlearning",
    "UnlearnResult": "moe_unlearn.unlearning",
    "UnlearnConfig": "moe_unlearn.unlearning",
    "apply_patch": "moe_unlearn.unlearning",
    "revert_patch": "moe_unlearn.unlearning",
    "OBJECTIVES": "moe_unlearn.unlearning",
    "SCOPES": "moe_unlearn.unlearning",
    # training loop (shared by unlearning, LoRAMoE fine-tuning and the benchmark model)
    "TrainConfig": "moe_unlearn.training",
    "train": "moe_unlearn.training",
    # evaluation
    "evaluate": "moe_unlearn.eval",
    "EvalReport": "moe_unlearn.eval",
    "record_routing": "moe_unlearn.eval",
    "compare_routing": "moe_unlearn.eval",
    # LoRAMoE
    "LoRAMoEConfig": "moe_unlearn.loramoe",
    "add_loramoe": "moe_unlearn.loramoe",
    "load_loramoe": "moe_unlearn.loramoe",
    "save_loramoe": "moe_unlearn.loramoe",
    # the built-in benchmark model and the demo
    "load_or_build": "moe_unlearn.bench_model",
    "bench_config": "moe_unlearn.bench_model",
    "unlearning_records": "moe_unlearn.bench_model",
    "qa_records": "moe_unlearn.bench_model",
    "run_demo": "moe_unlearn.demo",
    "run_frontier": "moe_unlearn.frontier",
    "FrontierConfig": "moe_unlearn.frontier",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_unlearn' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
