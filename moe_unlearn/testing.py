"""Tiny random-init models of each MoE family, for tests and examples (no hub access needed).

Every tiny model has hidden size 32, 2-3 decoder layers, 4-8 routed experts, top-2
routing and a 128-token vocabulary, so a forward pass takes milliseconds on a CPU.
Where a family can mix dense and sparse layers, its tiny config does so (one dense
layer) so that code skipping dense layers is exercised too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

# Common tiny sizes; each family's builder adds (or overrides) what its config needs.
_BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _mixtral() -> dict:
    return dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, head_dim=8)


def _qwen2_moe() -> dict:
    # layer 1 is dense (mlp_only_layers) so that dense layers are skipped
    return dict(model_type="qwen2_moe", num_hidden_layers=3, moe_intermediate_size=16, num_experts=6,
                num_experts_per_tok=2, norm_topk_prob=False, shared_expert_intermediate_size=24,
                decoder_sparse_step=1, mlp_only_layers=[1])


def _qwen3_moe() -> dict:
    return dict(model_type="qwen3_moe", moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                norm_topk_prob=True, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[])


def _olmoe() -> dict:
    return dict(model_type="olmoe", num_experts=8, num_experts_per_tok=2, intermediate_size=16, norm_topk_prob=False,
                pad_token_id=1, eos_token_id=2)


_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            num_key_value_heads=4)


def _deepseek_v2() -> dict:
    # group-limited greedy top-K with a scaling factor; layer 0 dense (first_k_dense_replace)
    return dict(model_type="deepseek_v2", **_MLA, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, topk_method="group_limited_greedy",
                n_group=2, topk_group=1, routed_scaling_factor=1.5)


def _deepseek_v3() -> dict:
    # sigmoid scores, correction bias, group-limited top-K, renormalisation, scaling; layer 0 dense
    return dict(model_type="deepseek_v3", **_MLA, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, norm_topk_prob=True,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _gpt_oss() -> dict:
    return dict(model_type="gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, head_dim=8,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _phimoe() -> dict:
    return dict(model_type="phimoe", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16)


def _granitemoe() -> dict:
    return dict(model_type="granitemoe", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16)


def _qwen3_next() -> dict:
    # hybrid: layer 0 linear attention (gated delta net), layer 1 full attention
    return dict(model_type="qwen3_next", moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=6,
                num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, linear_conv_kernel_dim=2,
                linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention", "full_attention"], decoder_sparse_step=1, mlp_only_layers=[])


def _dbrx() -> dict:
    return dict(model_type="dbrx", d_model=32, n_heads=4, n_layers=2, max_seq_len=128,
                attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))


def _minimax() -> dict:
    # hybrid: layer 0 lightning (linear) attention, layer 1 full attention
    return dict(model_type="minimax", num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, head_dim=8,
                layer_types=["linear_attention", "full_attention"], block_size=4)


def _flex_olmo() -> dict:
    return dict(model_type="flex_olmo", num_experts=4, num_experts_per_tok=2, intermediate_size=16,
                norm_topk_prob=True, pad_token_id=1, eos_token_id=2)


def _glm4_moe() -> dict:
    return dict(model_type="glm4_moe", num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1,
                routed_scaling_factor=1.8, norm_topk_prob=True, head_dim=8, pad_token_id=1, eos_token_id=2)


def _dots1() -> dict:
    return dict(model_type="dots1", num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=4, topk_group=2,
                routed_scaling_factor=2.0, norm_topk_prob=False, head_dim=8)


def _hunyuan_v1_moe() -> dict:
    return dict(model_type="hunyuan_v1_moe", num_experts=4, moe_topk=2, intermediate_size=16, head_dim=8,
                pad_token_id=1, eos_token_id=2, bos_token_id=3)


def _ernie4_5_moe() -> dict:
    # layer 0 dense (moe_layer_start_index=1)
    return dict(model_type="ernie4_5_moe", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1, head_dim=8,
                pad_token_id=1, eos_token_id=2, bos_token_id=3)


# family name (= transformers model_type) -> function returning config kwargs (model_type included)
TINY_FAMILIES: dict[str, Callable[[], dict]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "phimoe": _phimoe,
    "granitemoe": _granitemoe,
    "qwen3_next": _qwen3_next,
    "dbrx": _dbrx,
    "minimax": _minimax,
    "flex_olmo": _flex_olmo,
    "glm4_moe": _glm4_moe,
    "dots1": _dots1,
    "hunyuan_v1_moe": _hunyuan_v1_moe,
    "ernie4_5_moe": _ernie4_5_moe,
}

# Families whose full score distribution is a sigmoid (DeepSeek-V3 style); all others are softmax.
SIGMOID_FAMILIES: tuple[str, ...] = ("deepseek_v3", "glm4_moe", "dots1")
SOFTMAX_FAMILIES: tuple[str, ...] = tuple(f for f in TINY_FAMILIES if f not in SIGMOID_FAMILIES)
# Families with shared (always-on) experts beside the routed ones.
SHARED_EXPERT_FAMILIES: tuple[str, ...] = ("qwen2_moe", "deepseek_v2", "deepseek_v3", "qwen3_next", "glm4_moe",
                                           "dots1", "hunyuan_v1_moe", "ernie4_5_moe")

_DBRX_ONLY = {"d_model", "n_heads", "n_layers", "max_seq_len", "attn_config", "ffn_config"}


def tiny_config(family: str, **overrides):
    """The transformers config of the tiny `family` model; `overrides` replace any field."""
    if family not in TINY_FAMILIES:
        raise KeyError(f"no tiny config for {family!r}; known: {sorted(TINY_FAMILIES)}")
    own = TINY_FAMILIES[family]()
    base = {} if _DBRX_ONLY & set(own) else _BASE  # DBRX names its sizes differently
    kwargs = {**base, **own, **overrides}
    model_type = kwargs.pop("model_type")
    if model_type == "dbrx":
        kwargs.setdefault("vocab_size", _BASE["vocab_size"])
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def _randomise_zero_init(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Give parameters/buffers that transformers initialises to zero (expert biases, DeepSeek-V3's
    e_score_correction_bias) random values, so tests exercise the code paths that read them."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        elif name.endswith("e_score_correction_bias"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)


def tiny_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A random-init tiny causal LM of `family` in eval mode, fp32, deterministic for `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    _randomise_zero_init(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def tiny_dense_model(seed: int = 0) -> PreTrainedModel:
    """A tiny dense Llama (no experts), for tests of the not-an-MoE paths."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **_BASE, head_dim=8)
    return AutoModelForCausalLM.from_config(config).eval()


def save_to_hub_cache(cache_dir, repo_id: str, *objects, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """Save `objects` (a model, a tokenizer: anything with save_pretrained) as the Hugging Face hub
    cache stores a download of `repo_id` under `cache_dir`: models--org--name/blobs/<sha256> files,
    snapshots/<commit>/ links to them, refs/main naming the commit. Lets tests and the README's
    walkthrough resolve a hub id offline; returns the snapshot folder."""
    import hashlib
    import os
    import shutil
    import tempfile
    from pathlib import Path

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
        for src in sorted(Path(tmp).rglob("*")):
            if not src.is_file():
                continue
            blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copyfile(src, blob)
            link = snap / src.relative_to(tmp)
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap
