"""Evaluation of an (unlearned) MoE model: quality per split, membership inference,
multiple choice, and routing shift against the original model.

    report = evaluate(model, tok, forget="forget.jsonl", retain="retain.jsonl", holdout="holdout.jsonl",
                      original_routing={"forget": rec_f, "retain": rec_r}, target=(layer, expert))
    report.write_all("out/")   # report.json, report.md, routing_overlap.png

`record_routing(original_model, tok, data)` records the original routing once for reuse.
"""

from moe_unlearn.eval.items import EvalItem, McqItem, as_items, as_mcq_items, read_records
from moe_unlearn.eval.mcq import McqResult, mcq_accuracy
from moe_unlearn.eval.metrics import SplitMetrics, rouge_l
from moe_unlearn.eval.mia import MIA_ATTACKS, MIAResult, auc, privleak
from moe_unlearn.eval.report import EvalReport
from moe_unlearn.eval.routing import RoutingComparison, compare_routing, record_routing
from moe_unlearn.eval.scoring import PromptFormat, RoutingRecording
from moe_unlearn.eval.suite import evaluate

__all__ = ["MIA_ATTACKS", "EvalItem", "EvalReport", "MIAResult", "McqItem", "McqResult", "PromptFormat",
           "RoutingComparison", "RoutingRecording", "SplitMetrics", "as_items", "as_mcq_items", "auc",
           "compare_routing", "evaluate", "mcq_accuracy", "privleak", "read_records", "record_routing", "rouge_l"]
