"""Run a transformers 5 decoder from any layer upwards, on given hidden states.

When only layers >= l train, the hidden states entering layer l never change, so they can be
computed once and cached; each step then runs `layers[l:]`, the final norm and the lm_head.
This module holds the model-structure knowledge for that (embedding, rotary embedding,
causal-mask creation, decoder layers, final norm, lm_head) and nothing else. It mirrors what
the models' own `forward` does for a plain (no KV cache) forward pass; tests compare it with
`model(...)` logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import NotAnMoEModel


@dataclass
class StackInputs:
    """Everything the decoder layers need besides the hidden states; recomputed cheaply per batch."""

    attention_mask: Any  # a mask tensor / None, or {layer_type: mask} for models mixing attention types
    position_ids: torch.Tensor  # [1, S]
    position_embeddings: Any  # (cos, sin) from the rotary embedding


def _cache_kwarg(fn: Any) -> str:
    """The name of the KV-cache argument of a transformers mask function: `cache` in recent releases,
    `past_key_values` (deprecated there, to be removed in 5.40) in earlier ones."""
    import inspect

    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


class DecoderStack:
    """The decoder of a causal LM as a sequence of steps: embed -> layers[i] ... -> norm -> lm_head.

    stack = DecoderStack(model)
    inp = stack.inputs(input_ids, attention_mask)
    h = stack.embed(input_ids)
    h = stack.run(h, inp, start=0, stop=l)           # hidden states entering layer l
    logits = stack.logits(stack.run(h, inp, start=l))  # == model(input_ids, attention_mask).logits
    """

    def __init__(self, model: nn.Module) -> None:
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers"):
            raise NotAnMoEModel(f"{type(model).__name__}: expected a causal LM with .model.layers "
                                "(a transformers decoder); prefix caching cannot run on it, turn it off")
        self.model = model
        self.base = base
        self.config = base.config
        self.layers: nn.ModuleList = base.layers
        self.embed_tokens: nn.Module = base.get_input_embeddings()
        self.rotary_emb: nn.Module | None = getattr(base, "rotary_emb", None)
        self.norm: nn.Module = base.norm
        self.lm_head: nn.Module = model.get_output_embeddings()
        types = self._layer_types() or []
        other = sorted(set(types) - {"full_attention", "sliding_attention"})
        if other:  # e.g. Qwen3-Next linear-attention layers take other inputs
            raise NotAnMoEModel(f"{type(model).__name__}: layer types {other} are not supported by the "
                                "layer-stack runner; run the whole model (prefix caching off)")
        # GraniteMoE scales embeddings and logits; other families leave these unset
        self.embedding_multiplier = float(getattr(self.config, "embedding_multiplier", 1.0) or 1.0)
        self.logits_scaling = float(getattr(self.config, "logits_scaling", 1.0) or 1.0)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _layer_types(self) -> list[str] | None:
        types = getattr(self.config, "layer_types", None)
        return list(types) if types else None

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> StackInputs:
        """Causal mask, position ids and rotary embeddings for a [B, S] batch (right padding or none)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        w = self.embed_tokens.weight  # a plain tensor of its dtype / device even when w is an FSDP2 shard
        embeds_like = torch.empty((input_ids.shape[0], input_ids.shape[1], 1), dtype=w.dtype, device=w.device)
        embeds_like = embeds_like.expand(-1, -1, self.config.hidden_size)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        kwargs = dict(config=self.config, inputs_embeds=embeds_like, attention_mask=attention_mask,
                      position_ids=position_ids)
        kwargs[_cache_kwarg(create_causal_mask)] = None  # no KV cache; the argument's name changed in transformers 5
        types = self._layer_types()
        if types is not None and len(set(types)) > 1:
            mask: Any = {"full_attention": create_causal_mask(**kwargs),
                         "sliding_attention": create_sliding_window_causal_mask(**kwargs)}
        elif getattr(self.config, "sliding_window", None) is not None and (types is None or
                                                                          types[0] == "sliding_attention"):
            mask = create_sliding_window_causal_mask(**kwargs)
        else:
            mask = create_causal_mask(**kwargs)
        pos_emb = None
        if self.rotary_emb is not None:
            pos_emb = self.rotary_emb(embeds_like, position_ids=position_ids)
        return StackInputs(attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        return h * self.embedding_multiplier if self.embedding_multiplier != 1.0 else h

    def run(self, hidden: torch.Tensor, inputs: StackInputs, *, start: int = 0, stop: int | None = None
            ) -> torch.Tensor:
        """Apply decoder layers [start, stop) to `hidden` [B, S, H] (the states entering layer `start`)."""
        stop = self.num_layers if stop is None else stop
        types = self._layer_types()
        for i in range(start, stop):
            mask = inputs.attention_mask
            if isinstance(mask, dict):
                mask = mask[types[i]]
            out = self.layers[i](hidden, attention_mask=mask, position_ids=inputs.position_ids, use_cache=False,
                                 position_embeddings=inputs.position_embeddings)  # no KV cache: its default
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the output of the last layer."""
        logits = self.lm_head(self.norm(hidden))
        return logits / self.logits_scaling if self.logits_scaling != 1.0 else logits

    @torch.no_grad()
    def hidden_entering(self, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                        ) -> torch.Tensor:
        """[B, S, H] hidden states entering decoder layer `layer` (no autograd graph)."""
        inputs = self.inputs(input_ids, attention_mask)
        return self.run(self.embed(input_ids), inputs, start=0, stop=layer)
