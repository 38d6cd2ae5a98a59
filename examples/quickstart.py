"""The core path on the built-in benchmark model: attribute -> unlearn one expert -> evaluate -> revert.

    .venv/bin/python examples/quickstart.py   # builds the benchmark model once (cached), then ~10 s

Swap `bench.path` for the directory of any supported transformers MoE model and the split files
for your own forget / retain / holdout data (QA records are unlearned on their answer tokens).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import moe_unlearn as mu


def main() -> None:
    bench = mu.load_or_build()  # the demo's model, trained once and cached under ~/.cache/moe-unlearn
    model = mu.load_model(bench.path)  # local files only; no code from the folder runs
    tok = mu.load_tokenizer(bench.path)
    facts = bench.facts  # splits: forget, retain_train, utility (never given to unlearning), neighbor, holdout
    forget, retain = mu.unlearning_records(facts.forget), mu.unlearning_records(facts.retain_train)

    for layer in mu.find_moe_layers(model):
        print(layer)
    attr = mu.attribute_experts(model, forget, tokenizer=tok, retain=retain, stability=True, progress=False)
    print("candidates:", attr.top(3))
    print(attr.premise())  # coverage and selectivity: does the forget data sit in the target expert?

    original = mu.record_routing(model, tok, mu.qa_records(facts.forget))  # routing before unlearning, for the shift metrics
    with tempfile.TemporaryDirectory() as tmp:
        result = mu.unlearn(model, forget, retain, tokenizer=tok, method="npo", scope="uoe", target=attr,
                            steps=40, lr=3e-3, out_dir=Path(tmp) / "patch", progress=False)
        print(f"trained {result.trainable_params:,} parameters of target {result.targets} "
              f"in {result.wall_time:.1f} s")
        report = mu.evaluate(model, tok, forget=mu.qa_records(facts.forget), retain=mu.qa_records(facts.utility),
                             holdout=mu.qa_records(facts.holdout),
                             original_routing={"forget": original}, target=result.targets[0], generate=False,
                             progress=False)
        print(report.to_markdown())
        mu.revert_patch(model, result.patch_path)  # bit-exact: the model is the original again


if __name__ == "__main__":
    main()
