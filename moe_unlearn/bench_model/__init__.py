"""The built-in benchmark: a world of fictitious facts and a small MoE trained to know them.

    from moe_unlearn.bench_model import bench_config, load_or_build
    bench = load_or_build(bench_config("natural"))   # cached under $MOE_UNLEARN_CACHE or ~/.cache/moe-unlearn
    bench.facts.forget / .retain_train / .utility / .neighbor / .holdout   # lists of Fact
    ref = load_or_build(bench_config("natural", retrained=True))   # the same recipe without the forget split
"""

from moe_unlearn.bench_model.build import (
    BENCH_MODELS,
    BenchModel,
    BenchModelConfig,
    answer_exact_match,
    bench_config,
    build_bench_model,
    cache_path,
    default_cache_root,
    load_bench_model,
    load_or_build,
)
from moe_unlearn.bench_model.facts import (
    SPLITS,
    TRAINED_SPLITS,
    Fact,
    FactsConfig,
    FactSet,
    completion_records,
    generate_facts,
    paraphrase_records,
    qa_records,
    unlearning_records,
)
from moe_unlearn.bench_model.tokenizer import train_tokenizer

__all__ = ["BENCH_MODELS", "SPLITS", "TRAINED_SPLITS", "BenchModel", "BenchModelConfig", "Fact", "FactSet", "FactsConfig", "answer_exact_match", "bench_config",
           "completion_records", "paraphrase_records",
           "build_bench_model", "cache_path", "default_cache_root", "generate_facts", "load_bench_model",
           "load_or_build", "qa_records", "train_tokenizer", "unlearning_records"]
