"""Router observability: how much router mass each LoRA expert gets, per sample type.

The training step hands each forward's RoutingContext to `RoutingMassObserver.update`;
the observer sums G(x) over valid tokens (padding excluded) per layer, type and expert.
`save` writes `routing_mass.json` and one PNG per layer group (the layers that wrap the
same projection, e.g. all `down_proj`), each showing the mean gate per (layer, expert)
for every type, with the expert groups marked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_unlearn.atomic import atomic_path, write_text
from moe_unlearn.loramoe.balance import RoutingContext

UNTYPED = "<untyped>"
JSON_FILE = "routing_mass.json"


class RoutingMassObserver:
    """Accumulates detached per-(layer, type, expert) router mass over many forward passes."""

    def __init__(self) -> None:
        self.mass: dict[str, dict[str, torch.Tensor]] = {}  # layer -> type -> [E] float64 summed G
        self.tokens: dict[str, dict[str, int]] = {}  # layer -> type -> valid tokens

    def update(self, ctx: RoutingContext) -> None:
        B, S = ctx.batch_shape
        mask = ctx.mask.reshape(B, S).float() if ctx.mask is not None else torch.ones(B, S)
        types = [t if t is not None else UNTYPED for t in ctx.types]
        names = sorted(set(types))
        type_id = torch.tensor([names.index(t) for t in types])
        for layer, probs in ctx.records:
            p = probs.detach().float().reshape(B, S, -1)
            m = mask.to(p.device)
            per_sample = torch.einsum("bse,bs->be", p, m).cpu().double()  # [B, E]
            per_type = torch.zeros(len(names), p.shape[-1], dtype=torch.float64).index_add_(0, type_id, per_sample)
            counts = torch.zeros(len(names), dtype=torch.long).index_add_(0, type_id, m.sum(1).long().cpu())
            lm, lt = self.mass.setdefault(layer, {}), self.tokens.setdefault(layer, {})
            for i, t in enumerate(names):
                lm[t] = lm.get(t, torch.zeros_like(per_type[i])) + per_type[i]
                lt[t] = lt.get(t, 0) + int(counts[i])

    def mean_gate(self) -> dict[str, dict[str, list[float]]]:
        """layer -> type -> [E]: average G(x)_e over that type's valid tokens (sums to 1 per type)."""
        return {layer: {t: (m / max(1, self.tokens[layer][t])).tolist() for t, m in per.items()}
                for layer, per in self.mass.items()}

    def group_mass(self, expert_group: list[int]) -> dict[str, dict[str, list[float]]]:
        """layer -> type -> [G]: share of the router mass each expert group gets."""
        groups = torch.tensor(expert_group)
        num = int(groups.max()) + 1
        out: dict[str, dict[str, list[float]]] = {}
        for layer, per in self.mean_gate().items():
            out[layer] = {t: torch.zeros(num, dtype=torch.float64).index_add_(
                0, groups, torch.tensor(v, dtype=torch.float64)).tolist() for t, v in per.items()}
        return out

    def summary(self, expert_group: list[int]) -> dict[str, list[float]]:
        """type -> [G]: group mass averaged over all layers (the one-line answer to 'did the groups separate')."""
        acc: dict[str, list[torch.Tensor]] = {}
        for per in self.group_mass(expert_group).values():
            for t, v in per.items():
                acc.setdefault(t, []).append(torch.tensor(v))
        return {t: torch.stack(v).mean(0).tolist() for t, v in acc.items()}

    def to_dict(self, expert_group: list[int], group_types: list[str] | None) -> dict:
        return {"expert_group": list(expert_group), "group_types": group_types,
                "tokens": self.tokens, "mean_gate": self.mean_gate(),
                "group_mass": self.group_mass(expert_group), "summary": self.summary(expert_group)}

    def save(self, out_dir: str | Path, expert_group: list[int], group_types: list[str] | None,
             plots: bool = True) -> list[Path]:
        """Write routing_mass.json (+ routing_<group>.png per layer group) into out_dir, each file atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [write_text(out_dir / JSON_FILE,
                              json.dumps(self.to_dict(expert_group, group_types), indent=1) + "\n")]
        if plots and self.mass:
            for kind, layers in _layer_groups(list(self.mass)).items():
                written.append(self._plot(out_dir / f"routing_{kind}.png", kind, layers, expert_group))
        return written

    def _plot(self, path: Path, kind: str, layers: list[str], expert_group: list[int]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        gates = self.mean_gate()
        types = sorted({t for layer in layers for t in gates[layer]})
        fig, axes = plt.subplots(1, len(types), figsize=(1.0 + 2.6 * len(types), 1.8 + 0.3 * len(layers)),
                                 squeeze=False)
        bounds = [i + 0.5 for i in range(len(expert_group) - 1) if expert_group[i] != expert_group[i + 1]]
        for ax, t in zip(axes[0], types, strict=True):
            num_e = len(expert_group)
            data = torch.tensor([gates[layer].get(t, [float("nan")] * num_e) for layer in layers])
            im = ax.imshow(data.numpy(), aspect="auto", vmin=0.0, cmap="viridis")
            for b in bounds:
                ax.axvline(b, color="white", linewidth=1.5)
            ax.set_title(f"type: {t}", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(layers)), [_short(layer) for layer in layers], fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"mean router gate, {kind}", fontsize=10)
        fig.tight_layout()
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=90)
        finally:
            plt.close(fig)
        return path


def _layer_groups(layers: list[str]) -> dict[str, list[str]]:
    """Group layer names by the projection they wrap ('mlp.down_proj', 'shared_expert.up_proj', ...)."""
    out: dict[str, list[str]] = {}
    for name in layers:
        parts = name.split(".")
        kind = ".".join(p for p in parts[-2:] if not p.isdigit())
        out.setdefault(kind.replace(".", "_"), []).append(name)
    return out


def _short(name: str) -> str:
    digits = [p for p in name.split(".") if p.isdigit()]
    return f"layer {digits[0]}" if digits else name


@torch.no_grad()
def observe_routing(model: torch.nn.Module, batches, max_batches: int | None = None) -> RoutingMassObserver:
    """Router mass of `model` as it is now (no training), over batches with input_ids, attention_mask
    and optional types (a list of labels per batch)."""
    from moe_unlearn.loramoe.balance import routing_context

    observer = RoutingMassObserver()
    device = next(model.parameters()).device
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        mask = batch["attention_mask"].to(device)
        with routing_context(model, mask, batch.get("types")) as ctx:
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
        observer.update(ctx)
    return observer
