"""Evaluation of an (unlearned) MoE model: quality per split, membership inference,
multiple choice, and routing shift against the original model.

    report = evaluate(model, tok, forget="forget.jsonl", retain="retain.jsonl", holdout="holdout.jsonl",
                      original_routing={"forget": rec_f, "retain": rec_r}, target=(layer, expert))
    report.write_all("out/")   # report.json, report.md, routing_overlap.png

`record_routing(original_model, tok, data)` records the original routing once for reuse.
`convention="muse" | "open-unlearning"` picks the benchmark's choices (eval.conventions);
`tofu_evaluate` gives TOFU's forget quality and model utility; `evaluate_sequential` /
`evaluate_scalability` run MUSE's sustainability and scalability evaluations.
"""

from moe_unlearn.eval.conventions import CONVENTIONS, Convention, get_convention
from moe_unlearn.eval.items import EvalItem, McqItem, as_items, as_mcq_items, read_records
from moe_unlearn.eval.mcq import McqResult, mcq_accuracy
from moe_unlearn.eval.metrics import SplitMetrics, rouge_l
from moe_unlearn.eval.mia import MIA_ATTACKS, MUSE_RETRAIN_AUC, MIAResult, auc, privleak
from moe_unlearn.eval.report import EvalReport
from moe_unlearn.eval.routing import RoutingComparison, compare_routing, record_routing
from moe_unlearn.eval.scoring import PromptFormat, RoutingRecording
from moe_unlearn.eval.sequential import UnlearnRequest, evaluate_scalability, evaluate_sequential
from moe_unlearn.eval.suite import evaluate, reference_mia_aucs
from moe_unlearn.eval.tofu import TofuResult, forget_quality, tofu_evaluate

__all__ = ["CONVENTIONS", "MIA_ATTACKS", "MUSE_RETRAIN_AUC", "Convention", "EvalItem", "EvalReport", "MIAResult", "McqItem", "McqResult", "PromptFormat",
           "RoutingComparison", "RoutingRecording", "SplitMetrics", "as_items", "as_mcq_items", "auc",
           "TofuResult", "UnlearnRequest", "compare_routing", "evaluate", "evaluate_scalability", "evaluate_sequential",
           "forget_quality", "get_convention", "mcq_accuracy", "privleak", "read_records", "record_routing",
           "reference_mia_aucs", "rouge_l", "tofu_evaluate"]
