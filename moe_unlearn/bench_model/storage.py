"""The storage maps of the built-in bench models (`moe-unlearn locate --bench NAME`)."""

from __future__ import annotations

import os

import torch

from moe_unlearn.locate import (
    Component,
    LocateConfig,
    ModelParts,
    StorageMap,
    draw_sample,
    encode_sample,
    item_text,
    read_items,
    score_sample,
    storage_map,
)

REFERENCE_TOLERANCE = 0.03  # the implanted control: ablating its expert gives the reference within this EM


def locate_bench(name: str, *, cache_root: str | os.PathLike | None = None, out_dir: str | os.PathLike = "benchmarks/results",
                 quick: bool = False, config: LocateConfig | None = None, progress: bool = True,
                 realization: int = 0) -> StorageMap:
    """The storage map of a built-in bench model (forget / utility QA, retain_train for the means),
    written as <out_dir>/storage_<name>.{json,md,png}. Where the retrained reference is at hand
    (cache or shipped) its forget / utility EM on the same items is recorded; for the implanted
    control the implant expert gets its own row and `meta["implant_check"]` says whether zeroing it
    gives the reference within REFERENCE_TOLERANCE."""
    from moe_unlearn.bench_model import bench_config, load_or_build, qa_records
    from moe_unlearn.bench_model.build import META_FILE, cache_path, shipped_path
    from moe_unlearn.eval.scoring import pad_token_id

    cfg = bench_config(name, quick=quick, realization=realization)
    bench = load_or_build(cfg, cache_root=cache_root, progress=progress)
    f = bench.facts
    retain = qa_records(f.retain_train) + [{"text": t} for x in f.retain_train for t in (x.text, *x.paraphrases)]
    config = config or LocateConfig()
    components = None
    if cfg.implanted:
        from moe_unlearn.attribution import attribute_experts

        parts = ModelParts(bench.model)
        texts = [item_text(i) for i in read_items(qa_records(f.forget), "forget")]
        att = attribute_experts(bench.model, texts, tokenizer=bench.tokenizer, progress=False,
                                retain=[item_text(i) for i in read_items(retain, "retain")])
        pair = (cfg.implant_layer, cfg.implant_expert)
        components = [*parts.components(config, att),
                      Component(f"implant {pair[0]}/{pair[1]}", "experts", "implant", (pair[0],), (pair,))]
    smap = storage_map(bench.model, bench.tokenizer, qa_records(f.forget), qa_records(f.utility), retain=retain,
                       config=config, components=components, progress=progress)
    from moe_unlearn.frontier import device_name

    smap.meta.update({"model": name, "quick": quick, "realization": realization, "digest": bench.meta.get("digest"),
                      "weights_sha256": bench.meta.get("weights_sha256"), "device": device_name(),
                      "threads": torch.get_num_threads(), "exact_match": bench.meta.get("exact_match")})
    ref_cfg = cfg.retrained()
    if (cache_path(ref_cfg, cache_root) / META_FILE).is_file() or shipped_path(ref_cfg) is not None:
        ref = load_or_build(ref_cfg, cache_root=cache_root, progress=progress)
        c = smap.config
        enc = {s: encode_sample(bench.tokenizer, draw_sample(read_items(qa_records(getattr(f, s)), s), c["sample"], c["seed"] + k),
                          c["max_length"]) for k, s in ((0, "forget"), (1, "utility"))}
        ref.model.eval()
        smap.meta["reference"] = {"name": ref_cfg.name, "weights_sha256": ref.meta.get("weights_sha256"),
                                  **{s: score_sample(ref.model, enc[s], c["batch_size"], pad_token_id(ref.tokenizer))
                                     for s in ("forget", "utility")}}
        if cfg.implanted:
            rows = {m: smap.row(f"implant {cfg.implant_layer}/{cfg.implant_expert}", m) for m in c["methods"]}
            check = {}
            for m, r in rows.items():
                gaps = {s: abs(r[s]["em"] - smap.meta["reference"][s]["em"]) for s in ("forget", "utility")}
                check[m] = {**{f"{s}_gap": round(v, 4) for s, v in gaps.items()},
                            "passes": all(v <= REFERENCE_TOLERANCE + 1e-9 for v in gaps.values())}
            smap.meta["implant_check"] = {"tolerance": REFERENCE_TOLERANCE, **check}
    stem = f"storage_{name}" + (f"_r{realization}" if realization else "") + ("_quick" if quick else "")
    smap.write(out_dir, stem, title=f"Storage map of the {name} bench model")
    return smap


__all__ = ["REFERENCE_TOLERANCE", "locate_bench"]
