"""The built-in benchmark: a world of fictitious facts and a small MoE trained to know them.

    from moe_unlearn.bench_model import BenchModelConfig, load_or_build
    bench = load_or_build(BenchModelConfig())   # cached under $MOE_UNLEARN_CACHE or ~/.cache/moe-unlearn
    bench.facts.forget / .retain / .neighbor / .holdout   # lists of Fact (question, answer, text)
"""

from moe_unlearn.bench_model.build import (
    BenchModel,
    BenchModelConfig,
    answer_exact_match,
    build_bench_model,
    cache_path,
    default_cache_root,
    load_bench_model,
    load_or_build,
)
from moe_unlearn.bench_model.facts import SPLITS, Fact, FactsConfig, FactSet, generate_facts
from moe_unlearn.bench_model.tokenizer import train_tokenizer

__all__ = ["SPLITS", "BenchModel", "BenchModelConfig", "Fact", "FactSet", "FactsConfig", "answer_exact_match",
           "build_bench_model", "cache_path", "default_cache_root", "generate_facts", "load_bench_model",
           "load_or_build", "train_tokenizer"]
