"""Expert attribution: which routed experts of an MoE model the forget data uses.

attribute_experts streams the data through the model in batches (one forward pass per
batch, no [T, E] tensor kept beyond the batch) and accumulates, per (MoE layer, routed
expert), through the op `moe_unlearn.ops.routing_stats`:

- affinity (UOE/SEUF, Zhuang et al. 2025):  a_i = (1/Z) sum_j (1/L_j) sum_t g_{i,t}
  with g_{i,t} the full score s_{i,t} where i is in token t's top-K, else 0, over Z
  sequences of L_j real tokens;
- frequency: fraction of tokens whose top-K holds i;
- mean_score: mean over tokens of the full score s_{i,t} (softmax, or sigmoid for
  DeepSeek-V3-style routers: whatever the layer's `scores_from_logits` is);
- counts: number of tokens whose top-K holds i.

Padding never counts; a sequence with no tokens is not one of the Z sequences.

The premise check (UOE assumes the forget knowledge sits in the target expert): with
`retain=...` the retain data is scored too, and
- selectivity(l, e) = frequency on forget / frequency on retain (the retain frequency floored at
  half a token, 0.5 / retain tokens, so an expert no retain token selects gets a finite value);
- coverage(S) = share of forget tokens whose top-K contains an expert of the target set S at
  its layer (any layer of S), from the per-token top-K kept for the forget data.
`Attribution.premise(targets)` returns both and warns (PremiseWarning) below coverage 0.5 or
selectivity 2. Routing is not storage: given the model and forget / utility data,
`moe_unlearn.locate.knowledge_premise` also zero-ablates the targets and passes the result as
`premise(..., knowledge=)`; the verdict then follows the knowledge; `select_targets(attribution, coverage=0.8)` adds experts until a coverage is met.
Shared experts (always-on MLPs beside the routed ones) are not scored: every token goes
through them, so their affinity would be 1.0 and they would always win; they are listed
per layer in `Attribution.shared_layers` and only enter `top()` with include_shared=True.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_unlearn import atomic
from moe_unlearn.arch import MoELayer, RoutingCapture, find_moe_layers
from moe_unlearn.arch.wrappers import unwrap_model
from moe_unlearn.data import DataSource, TokenizedBatches, load_texts, tokenize_batches
from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.identity import config_hash, model_identity
from moe_unlearn.validate import check_token_ids

NEAR_TIE_REL = 0.01  # runner-up within 1% of the chosen score -> near-tie
LOW_STABILITY = 0.5  # mean per-layer top-k overlap of the two halves below this -> warning
SHARED_EXPERT = -1  # the `expert` of a shared-expert entry in `top(include_shared=True)`
_STATS = ("affinity", "frequency", "mean_score", "counts")


class AttributionStabilityWarning(UserWarning):
    """The two random halves of the data rank experts too differently to trust the target."""


class PremiseWarning(UserWarning):
    """The chosen target experts do not hold the forget data: low coverage or low selectivity."""


PREMISE_MIN_COVERAGE = 0.5
PREMISE_MIN_SELECTIVITY = 2.0


@dataclass(frozen=True)
class Premise:
    """How well a target set fits UOE's premise. coverage: share of forget tokens routed through
    at least one target; selectivity: per target, forget / retain selection frequency (None
    without retain statistics); per_layer_coverage: the same share, counted per layer of S."""

    targets: list[tuple[int, int]]
    coverage: float
    selectivity: list[float] | None
    per_layer_coverage: dict[int, float]
    knowledge: Any = None  # moe_unlearn.locate.KnowledgeCheck: forget / utility with the targets zeroed

    @property
    def routing_holds(self) -> bool:
        sel_ok = self.selectivity is None or min(self.selectivity) >= PREMISE_MIN_SELECTIVITY
        return self.coverage >= PREMISE_MIN_COVERAGE and sel_ok

    @property
    def holds(self) -> bool:
        """The knowledge verdict where it was measured, else the routing one."""
        return self.knowledge.holds if self.knowledge is not None else self.routing_holds

    def to_dict(self) -> dict[str, Any]:
        return {"targets": [list(t) for t in self.targets], "coverage": self.coverage,
                "selectivity": self.selectivity,
                "per_layer_coverage": {str(k): v for k, v in self.per_layer_coverage.items()},
                "routing_holds": self.routing_holds,
                "knowledge": None if self.knowledge is None else self.knowledge.to_dict(), "holds": self.holds}


@dataclass(frozen=True)
class TopEntry:
    """One ranked candidate. near_tie: the next-ranked candidate scores within 1% of this one,
    so the choice between them is not meaningful. expert == SHARED_EXPERT for a shared expert."""

    layer: int
    expert: int
    score: float
    near_tie: bool = False
    shared: bool = False


@dataclass
class Attribution:
    """Routing statistics of a dataset, one row per MoE layer (`layers[r]` is the model's layer
    index of row r) and one column per routed expert."""

    layers: list[int]
    affinity: torch.Tensor  # [L, E] fp32, SEUF affinity score
    frequency: torch.Tensor  # [L, E] fp32, fraction of tokens selecting the expert
    mean_score: torch.Tensor  # [L, E] fp32, mean full score over tokens
    counts: torch.Tensor  # [L, E] int64, tokens selecting the expert
    top_k: list[int]  # per layer
    score_fns: list[str]  # per layer: "softmax" or "sigmoid"
    shared_layers: list[int]  # layer indices that have always-on shared experts
    num_sequences: int
    num_tokens: int
    num_truncated: int = 0
    stability: list[float] | None = None  # per layer, top-k overlap between two random halves
    stability_seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # model type, max_length, ...
    retain_frequency: torch.Tensor | None = None  # [L, E] fp32, frequency on the retain data
    retain_num_tokens: int | None = None
    # per layer, the top-K expert indices of every forget token [T, K] (int16, in memory only:
    # what coverage of an arbitrary target set needs; not written to JSON)
    token_topk: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_experts(self) -> int:
        return int(self.affinity.shape[1])

    # -- ranking ------------------------------------------------------------
    def _row(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise BadInputError(f"layer {layer} is not an attributed MoE layer; layers: {self.layers}") from None

    def ranking(self, stat: str = "affinity", *, include_shared: bool = False,
                layer: int | None = None) -> list[TopEntry]:
        """Every candidate, best first. Ties are broken by layer then expert index (ascending),
        so the order is deterministic."""
        if stat not in _STATS:
            raise BadInputError(f"stat must be one of {_STATS}, got {stat!r}")
        values = getattr(self, stat).double()
        rows = range(len(self.layers)) if layer is None else [self._row(layer)]
        cands: list[tuple[float, int, int, bool]] = []
        for r in rows:
            cands += [(float(values[r, e]), self.layers[r], e, False) for e in range(self.num_experts)]
            if include_shared and self.layers[r] in self.shared_layers:
                cands.append((1.0, self.layers[r], SHARED_EXPERT, True))
        # shared before routed on equal score; then layer, then expert
        cands.sort(key=lambda c: (-c[0], not c[3], c[1], c[2]))
        out = []
        for i, (score, lay, exp, shared) in enumerate(cands):
            nxt = cands[i + 1][0] if i + 1 < len(cands) else -math.inf
            out.append(TopEntry(lay, exp, score, _near(score, nxt), shared))
        return out

    def top(self, m: int = 1, per_layer: bool = False, *, stat: str = "affinity",
            include_shared: bool = False) -> list[TopEntry]:
        """The m best (layer, expert) candidates overall, or the m best of each layer (layer order).
        The SEUF target is `top()[0]`; check its near_tie flag before trusting it."""
        if not isinstance(m, int) or m < 1:
            raise BadInputError(f"m must be a positive integer, got {m!r}")
        if not per_layer:
            return self.ranking(stat, include_shared=include_shared)[:m]
        out: list[TopEntry] = []
        for lay in self.layers:
            out += self.ranking(stat, include_shared=include_shared, layer=lay)[:m]
        return out

    def target(self) -> tuple[int, int]:
        """(layer, expert) of the highest-affinity routed expert: the SEUF unlearning target."""
        best = self.top(1)[0]
        return best.layer, best.expert

    # -- premise ------------------------------------------------------------
    @property
    def selectivity(self) -> torch.Tensor | None:
        """[L, E] forget / retain selection frequency (None without retain statistics)."""
        if self.retain_frequency is None:
            return None
        floor = 0.5 / max(int(self.retain_num_tokens or 1), 1)
        return self.frequency / self.retain_frequency.clamp(min=floor)

    def coverage(self, targets: Sequence[Any]) -> float:
        """Share of forget tokens whose top-K holds at least one of `targets` ((layer, expert) pairs)."""
        return self._coverage([self._pair(t) for t in targets])[0]

    def _pair(self, t: Any) -> tuple[int, int]:
        from moe_unlearn.arch import ExpertTarget

        et = ExpertTarget.coerce(t)
        if et.shared:
            raise BadInputError("coverage and selectivity are defined for routed experts only, not shared ones")
        self._row(et.layer)
        if not 0 <= int(et.expert) < self.num_experts:
            raise BadInputError(f"expert {et.expert} out of range (0..{self.num_experts - 1})")
        return et.layer, int(et.expert)

    def _coverage(self, pairs: list[tuple[int, int]]) -> tuple[float, dict[int, float]]:
        by_layer: dict[int, list[int]] = {}
        for lay, exp in pairs:
            by_layer.setdefault(lay, []).append(exp)
        if self.token_topk is None:
            if len(pairs) == 1:  # one expert: its coverage is its selection frequency
                lay, exp = pairs[0]
                v = float(self.frequency[self._row(lay), exp])
                return v, {lay: v}
            raise BadInputError("coverage of several experts needs the per-token routing of the forget data, "
                                "which is kept in memory only; run attribute_experts again (not from JSON)")
        covered = torch.zeros(self.token_topk[0].shape[0], dtype=torch.bool)
        per_layer = {}
        for lay, exps in by_layer.items():
            topk = self.token_topk[self._row(lay)].long()
            hit = torch.isin(topk, torch.tensor(exps)).any(-1)
            per_layer[lay] = float(hit.double().mean()) if hit.numel() else 0.0
            covered |= hit
        return (float(covered.double().mean()) if covered.numel() else 0.0), per_layer

    def premise(self, targets: Sequence[Any] | None = None, *, warn: bool = True, knowledge: Any = None) -> Premise:
        """Coverage and selectivity of `targets` (default: the SEUF target); warns (PremiseWarning)
        when coverage < 0.5 or any target's selectivity < 2, saying what to do instead.

        knowledge: a measured `moe_unlearn.locate.KnowledgeCheck` of the same targets (forget / utility
        with them zeroed; `moe_unlearn.locate.knowledge_premise` measures it and calls this): the verdict
        then follows the knowledge, and the warning says when the targets do not hold the forget
        knowledge (whatever the routing says)."""
        pairs = [self._pair(t) for t in targets] if targets is not None else [self.target()]
        cov, per_layer = self._coverage(pairs)
        sel = self.selectivity
        sel_list = None if sel is None else [float(sel[self._row(lay), e]) for lay, e in pairs]
        result = Premise(targets=pairs, coverage=cov, selectivity=sel_list, per_layer_coverage=per_layer,
                         knowledge=knowledge)
        if warn and knowledge is not None and not knowledge.holds:
            warnings.warn(knowledge.not_held_message(pairs, f" (routing: coverage {cov:.2f})"), PremiseWarning,
                          stacklevel=2)
        elif warn and knowledge is None and not result.holds:
            sel_txt = "unknown (no retain data given)" if sel_list is None else ", ".join(f"{v:.2f}" for v in sel_list)
            cov_ok = cov >= PREMISE_MIN_COVERAGE
            sel_ok = sel_list is not None and all(v >= PREMISE_MIN_SELECTIVITY for v in sel_list)
            cov_txt = (f"coverage {cov:.2f} is enough" if cov_ok else
                       f"coverage {cov:.2f} of the forget tokens is below {PREMISE_MIN_COVERAGE}")
            if sel_list is None:
                sel_part = f"selectivity {sel_txt}"
            else:
                sel_part = (f"selectivity {sel_txt} is enough" if sel_ok else
                            f"selectivity {sel_txt} is below {PREMISE_MIN_SELECTIVITY}")
            joint = ", but " if cov_ok != sel_ok and (cov_ok or sel_list is not None) else ", and "
            warnings.warn(
                f"UOE's premise does not hold for targets {pairs}: {cov_txt}{joint}{sel_part}. "
                "The forget knowledge is spread: unlearning these experts alone plateaus or damages the retain "
                "tokens routed through them. Use select_targets(attribution, coverage=0.8) for a covering set, "
                "projections that protect retain tokens, or a full-model baseline.", PremiseWarning, stacklevel=2)
        return result

    def check_model(self, model: nn.Module) -> None:
        """BadInputError unless this attribution was made on `model` (same config hash, recorded since the
        model identity is stored) and its layers, expert counts and top-K match the model's MoE layers:
        the experts it names are then the model's own."""
        recorded = (self.meta.get("model") or {}).get("config_hash") if isinstance(self.meta, dict) else None
        if recorded and recorded != config_hash(model):
            name = (self.meta.get("model") or {}).get("name_or_path") or "another model"
            raise BadInputError(f"this attribution was computed on a different model ({name!r}, config hash "
                                "differs); attribute the forget set on this model")
        by_idx = {layer.layer_idx: layer for layer in find_moe_layers(model)}
        for row, lay in enumerate(self.layers):
            layer = by_idx.get(lay)
            if layer is None or layer.num_experts != self.num_experts or (
                    row < len(self.top_k) and self.top_k[row] != layer.top_k):
                raise BadInputError(f"this attribution does not fit the model: its layer {lay} has "
                                    f"{self.num_experts} experts (top-{self.top_k[row] if row < len(self.top_k) else '?'})"
                                    f", the model's MoE layers are {sorted(by_idx)}; attribute on this model")

    # -- persistence --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": "moe-unlearn-attribution", "version": 1}
        for name in ("layers", "top_k", "score_fns", "shared_layers", "num_sequences", "num_tokens",
                     "num_truncated", "stability", "stability_seed", "meta"):
            d[name] = getattr(self, name)
        for name in _STATS:
            d[name] = getattr(self, name).tolist()
        d["target"] = [dict(vars(e)) for e in self.top(1)]
        if self.retain_frequency is not None:
            d["retain_frequency"] = self.retain_frequency.tolist()
            d["retain_num_tokens"] = self.retain_num_tokens
            d["selectivity"] = self.selectivity.tolist()
            d["premise"] = self.premise(warn=False).to_dict()
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the attribution as JSON (atomically: a temp file renamed into place)."""
        atomic.write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attribution:
        """An attribution from its JSON form, every field checked (types, one row per layer, finite values,
        top-K within the experts) before anything ranks it: a damaged file is one DataError, never NaN
        affinities that silently pick expert 0:0 or a row count that fails with IndexError after a model load."""
        from moe_unlearn.validate import check_int, check_number, check_tensor

        if not isinstance(d, dict) or d.get("format") != "moe-unlearn-attribution":
            raise DataError("not a moe-unlearn attribution (missing format tag); write it with Attribution.to_json")
        try:
            return cls._from_checked_dict(d, check_int, check_number, check_tensor)
        except BadInputError as exc:
            raise DataError(f"malformed attribution data: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed attribution data: {exc!r}") from exc

    @classmethod
    def _from_checked_dict(cls, d: dict[str, Any], check_int: Any, check_number: Any, check_tensor: Any
                           ) -> Attribution:
        def ints(name: str, low: int = 0) -> list[int]:
            if not isinstance(d[name], list):
                raise BadInputError(f"{name} must be a list of integers")
            return [check_int(f"{name}[{i}]", x, low=low) for i, x in enumerate(d[name])]

        layers = ints("layers")
        if not layers or len(set(layers)) != len(layers):
            raise BadInputError(f"layers must be distinct layer indices, at least one; got {layers}")
        tensors = {}
        for n in _STATS:
            try:
                t = torch.tensor(d[n], dtype=torch.int64 if n == "counts" else torch.float32)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise BadInputError(f"{n} is not a table of numbers ({' '.join(str(exc).split())[:80]})") from None
            tensors[n] = check_tensor(n, t, shape=(len(layers), None), error=BadInputError)
        num_experts = tensors["affinity"].shape[1]
        for n, t in tensors.items():
            check_tensor(n, t, shape=(len(layers), num_experts), error=BadInputError)
            if num_experts < 1 or bool((t < 0).any()):
                raise BadInputError(f"{n} must hold non-negative values for at least one expert per layer")
        top_k = ints("top_k", low=1)
        if len(top_k) != len(layers) or any(k > num_experts for k in top_k):
            raise BadInputError(f"top_k must give one value in 1..{num_experts} per layer, got {top_k}")
        score_fns = d["score_fns"]
        if not isinstance(score_fns, list) or len(score_fns) != len(layers) or any(
                f not in ("softmax", "sigmoid") for f in score_fns):
            raise BadInputError("score_fns must name softmax or sigmoid per layer")
        retain = d.get("retain_frequency")
        if retain is not None:
            retain = check_tensor("retain_frequency", torch.tensor(retain, dtype=torch.float32),
                                  shape=(len(layers), num_experts), error=BadInputError)
        stability = d.get("stability")
        if stability is not None:
            if not isinstance(stability, list) or len(stability) != len(layers):
                raise BadInputError("stability must give one number per layer")
            stability = [check_number("stability", x, low=0.0, high=1.0) for x in stability]
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise BadInputError("meta must be a mapping")
        retain_tokens = d.get("retain_num_tokens")
        seed = d.get("stability_seed")
        return cls(layers=layers, top_k=top_k, score_fns=list(score_fns), shared_layers=ints("shared_layers"),
                   num_sequences=check_int("num_sequences", d["num_sequences"], low=0),
                   num_tokens=check_int("num_tokens", d["num_tokens"], low=0),
                   num_truncated=check_int("num_truncated", d.get("num_truncated", 0), low=0), stability=stability,
                   stability_seed=None if seed is None else check_int("stability_seed", seed, low=0), meta=meta,
                   retain_frequency=retain,
                   retain_num_tokens=None if retain_tokens is None else check_int("retain_num_tokens", retain_tokens,
                                                                                  low=0), **tensors)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Attribution:
        from moe_unlearn.validate import read_json_file

        return cls.from_dict(read_json_file(path, what="attribution file"))

    # -- report -------------------------------------------------------------
    def plot(self, path: str | os.PathLike, *, stat: str = "affinity") -> None:
        """Heatmap PNG of `stat` (layers x experts) with the chosen target outlined, and beside it the
        selectivity (forget / retain share, log scale) when retain statistics exist; written atomically."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib import colors
        from matplotlib import pyplot as plt
        from matplotlib.patches import Rectangle

        panels = [(stat, getattr(self, stat).float().numpy(), None)]
        if self.retain_frequency is not None:
            sel = self.selectivity.float().clamp(min=1e-3).numpy()
            panels.append(("selectivity (forget / retain)", sel, colors.LogNorm(vmin=max(sel.min(), 1e-2),
                                                                             vmax=max(sel.max(), 1.01))))
        L, E = panels[0][1].shape
        w = min(2 + 0.35 * E, 24)
        fig, axes = plt.subplots(1, len(panels), figsize=(w * len(panels), min(1.5 + 0.35 * L, 24)), squeeze=False)
        try:
            best = self.top(1, stat=stat)[0]
            r = self.layers.index(best.layer)
            for ax, (label, values, norm) in zip(axes[0], panels, strict=True):
                im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest", norm=norm)
                fig.colorbar(im, ax=ax, label=label)
                ax.set_xlabel("routed expert")
                ax.set_ylabel("MoE layer")
                ax.set_yticks(range(L), [str(x) for x in self.layers])
                if E <= 64:
                    ax.set_xticks(range(E))
                ax.add_patch(Rectangle((best.expert - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            tie = " (near-tie!)" if best.near_tie else ""
            title = (f"{stat}: target layer {best.layer}, expert {best.expert} = {best.score:.4f}{tie}\n"
                     f"{self.num_sequences} sequences, {self.num_tokens} tokens")
            if self.retain_frequency is not None:
                p = self.premise(warn=False)
                title += f"; coverage {p.coverage:.2f}, selectivity {p.selectivity[0]:.2f}"
            fig.suptitle(title, fontsize=9)
            fig.tight_layout()
            with atomic.atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        finally:
            plt.close(fig)

    def summary(self, m: int = 3) -> str:
        """A few lines for humans: data size, the top candidates, near-tie and stability notes."""
        lines = [f"{self.num_sequences} sequences, {self.num_tokens} tokens"
                 + (f", {self.num_truncated} truncated" if self.num_truncated else "")]
        for i, e in enumerate(self.top(m)):
            lines.append(f"  #{i + 1}: layer {e.layer} expert {e.expert} affinity {e.score:.4f}"
                         + ("  [near-tie with the next]" if e.near_tie else ""))
        if self.shared_layers:
            lines.append(f"  shared experts (always on, not ranked) in layers {self.shared_layers}")
        if self.stability is not None:
            lines.append("  stability (top-k overlap of two halves) per layer: "
                         + ", ".join(f"{s:.2f}" for s in self.stability))
        p = self.premise(warn=False)
        sel = "" if p.selectivity is None else f", selectivity {p.selectivity[0]:.2f}"
        lines.append(f"  premise of the target: coverage {p.coverage:.2f}{sel}"
                     + ("" if p.holds else "  [UOE premise does NOT hold]"))
        return "\n".join(lines)


def select_targets(attribution: Attribution, coverage: float = 0.8, *, max_experts: int = 16,
                   warn: bool = True) -> list[tuple[int, int]]:
    """Routed experts, chosen greedily across layers, until they cover `coverage` of the forget tokens.

    Candidates are ranked by forget mass (affinity) times selectivity (affinity alone without
    retain statistics), ties by layer then expert, and added in that order until the share of
    forget tokens routed through at least one chosen expert reaches `coverage` (or max_experts
    are chosen: then a PremiseWarning says how far it got). The result is a list of
    (layer, expert) that `unlearn(scope="topm", target=...)` accepts."""
    if not 0.0 < coverage <= 1.0:
        raise BadInputError(f"coverage must be in (0, 1], got {coverage!r}")
    if not isinstance(max_experts, int) or max_experts < 1:
        raise BadInputError(f"max_experts must be a positive integer, got {max_experts!r}")
    sel = attribution.selectivity
    weight = attribution.affinity.double() * (sel.double() if sel is not None else 1.0)
    cands = sorted(((float(weight[r, e]), lay, e) for r, lay in enumerate(attribution.layers)
                    for e in range(attribution.num_experts)), key=lambda c: (-c[0], c[1], c[2]))
    chosen: list[tuple[int, int]] = []
    reached = 0.0
    for _, lay, e in cands:
        chosen.append((lay, e))
        reached = attribution._coverage(chosen)[0]
        if reached >= coverage or len(chosen) >= max_experts:
            break
    if warn and reached < coverage:
        warnings.warn(f"select_targets: {len(chosen)} experts cover {reached:.2f} of the forget tokens, short of "
                      f"{coverage}; raise max_experts or accept a lower coverage", PremiseWarning, stacklevel=2)
    return chosen


def _near(best: float, runner_up: float) -> bool:
    return math.isfinite(runner_up) and best - runner_up <= NEAR_TIE_REL * abs(best)


# -- computing it --------------------------------------------------------------

def score_fn_of(layer: MoELayer) -> str:
    """The routing_stats score function ("softmax" / "sigmoid") matching `layer.scores_from_logits`.

    Taken from the adapter's `score_fn` attribute when it has one; otherwise found by applying
    `scores_from_logits` to probe logits, so it always agrees with the adapter's own definition.
    """
    declared = getattr(layer, "score_fn", None)
    if declared in ("softmax", "sigmoid"):
        return declared
    probe = torch.linspace(-3.0, 2.0, 2 * layer.num_experts).reshape(2, layer.num_experts)
    probe = probe.to(next(layer.router.parameters()).device)
    scores = layer.scores_from_logits(probe).float()
    if torch.allclose(scores, torch.softmax(probe, -1), atol=1e-6):
        return "softmax"
    if torch.allclose(scores, torch.sigmoid(probe), atol=1e-6):
        return "sigmoid"
    from moe_unlearn.errors import UnsupportedFamily

    raise UnsupportedFamily(f"{type(layer).__name__}: its scores are neither softmax nor sigmoid of the router "
                            "logits; routing_stats cannot compute them")


class _LayerAccumulator:
    """Running sums of one layer over all batches (fp64, so the result does not depend on batching)."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        z = lambda dtype: torch.zeros(num_experts, dtype=dtype, device=device)
        self.affinity_sum = z(torch.float64)  # sum over sequences of per-sequence mean gate
        self.score_sum = z(torch.float64)
        self.counts = z(torch.int64)
        self.half_sums = torch.zeros(2, num_experts, dtype=torch.float64, device=device)

    def add(self, stats, seq_valid: torch.Tensor, halves: torch.Tensor | None) -> None:
        device = self.counts.device
        if stats.gate_sum.device != device:  # a layer on another device: its stats are tiny, move them
            stats = type(stats)(*(None if t is None else t.to(device) for t in vars(stats).values()))
        n = stats.tokens_per_seq.clamp(min=1).double()
        per_seq = (stats.gate_sum.double() / n[:, None]) * seq_valid[:, None]  # [S, E], 0 for empty sequences
        self.affinity_sum += per_seq.sum(0)
        self.score_sum += stats.score_sum.double()
        self.counts += stats.select_count
        if halves is not None:
            self.half_sums.index_add_(0, halves, per_seq)


class _PerDevice:
    """The batch's index tensors, copied once to each device that holds some MoE layer."""

    def __init__(self, keep: torch.Tensor | None, seq_ids: torch.Tensor) -> None:
        self._cache = {seq_ids.device: (keep, seq_ids)}

    def __call__(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        if device not in self._cache:
            keep, seq_ids = next(iter(self._cache.values()))
            self._cache[device] = (None if keep is None else keep.to(device), seq_ids.to(device))
        return self._cache[device]


def _topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    # stable sort: equal scores rank by expert index, as in Attribution.ranking
    ta = set(torch.sort(a, descending=True, stable=True).indices[:k].tolist())
    tb = set(torch.sort(b, descending=True, stable=True).indices[:k].tolist())
    return len(ta & tb) / k


def split_halves(num_sequences: int, seed: int) -> torch.Tensor:
    """[num_sequences] int64 of 0/1: the random halves `stability=True` compares (sequence i is in
    half split_halves(n, seed)[i]); half 0 has n // 2 sequences. Same split for the same seed."""
    perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed))
    halves = torch.zeros(num_sequences, dtype=torch.long)
    halves[perm[num_sequences // 2:]] = 1
    return halves


def _select_layers(all_layers: list[MoELayer], wanted: Sequence[int] | None) -> list[MoELayer]:
    if wanted is None:
        return all_layers
    by_idx = {layer.layer_idx: layer for layer in all_layers}
    missing = [w for w in wanted if w not in by_idx]
    if missing or not wanted:
        raise BadInputError(f"layers {list(wanted)}: not MoE layers of this model; its MoE layers are {sorted(by_idx)}")
    return [by_idx[w] for w in sorted(set(wanted))]


def _idle_passes(batches: Any, rank: int, world_size: int) -> int:
    """How many forward passes rank `rank` runs fewer than the busiest rank (batches i mod world are
    rank i's; empty ones are skipped)."""
    runs = [0] * world_size
    for i, batch in enumerate(batches):
        mask = batch["attention_mask"]
        if mask.shape[1] and bool(mask.any()):
            runs[i % world_size] += 1
    return max(runs) - runs[rank]


def attribute_experts(
    model: nn.Module,
    data: DataSource | TokenizedBatches,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int = 512,
    stability: bool = False,
    seed: int = 0,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    field: str | None = None,
    padding_side: str | None = None,
    retain: DataSource | TokenizedBatches | None = None,
    keep_token_routing: bool = True,
) -> Attribution:
    """Routing statistics of `data` (any source `moe_unlearn.data.load_texts` reads, or already
    tokenized `TokenizedBatches`) for every MoE layer of `model` (or only `layers`).

    One forward pass per batch under no_grad, in eval mode (the model's mode is restored).
    Under torch.distributed each rank reads batches i with i mod world == rank and the sums are
    all-reduced, so every rank returns the attribution of the whole data.
    Position ids come from the attention mask, so left and right padding give the same result.
    `device` is where the inputs go (default: the input embedding's device); the model is not moved.
    stability=True also ranks the experts of two random halves of the sequences (split with
    `seed`) and stores the per-layer top-k overlap; below 0.5 on average an
    AttributionStabilityWarning says the data is too small to choose a target.
    retain: also score this data (same settings) for selectivity; keep_token_routing keeps the
    forget tokens' top-K per layer in memory for `coverage` of target sets (int16, T x K per layer).
    """
    from moe_unlearn.distributed import all_reduce_, check_not_sharded, world
    from moe_unlearn.sharding import is_fsdp2

    model = unwrap_model(model)
    sharded = is_fsdp2(model)  # FSDP2: every rank must run the same number of forward passes
    if not sharded:
        check_not_sharded(model)
    rank, world_size = world()
    if keep_token_routing:  # every rank needs every token's routing (coverage, premise): no split
        rank, world_size = 0, 1
    moe_layers = _select_layers(find_moe_layers(model), layers)
    num_experts = {layer.num_experts for layer in moe_layers}
    if len(num_experts) != 1:
        raise BadInputError(f"MoE layers with different expert counts {sorted(num_experts)}; attribute them "
                            "separately with layers=[...]")
    E = num_experts.pop()
    score_fns = [score_fn_of(layer) for layer in moe_layers]

    if isinstance(data, TokenizedBatches):
        batches = data
    else:
        if tokenizer is None:
            raise BadInputError("attribute_experts needs tokenizer=... to tokenize text data")
        batches = tokenize_batches(load_texts(data, field=field), tokenizer, batch_size=batch_size,
                                   max_length=max_length, padding_side=padding_side)
    if batches.num_tokens == 0:
        raise DataError("the data has no tokens after tokenization")
    check_token_ids(model, batches.sequences)

    if device is None:  # where the inputs go: the input embedding's device
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        device = embeddings.weight.device if embeddings is not None else next(model.parameters()).device
    device = torch.device(device)
    halves = None
    if stability:
        if batches.num_texts < 2:
            raise DataError("stability=True needs at least 2 sequences to split into halves")
        halves = split_halves(batches.num_texts, seed).to(device)

    from moe_unlearn import ops  # resolved at call time: the kernels work may swap the backend

    accs = {layer.layer_idx: _LayerAccumulator(E, device) for layer in moe_layers}
    token_topk: dict[int, list[torch.Tensor]] = {layer.layer_idx: [] for layer in moe_layers}
    num_seqs = num_tokens = 0
    # the decoder only (the LM head is not needed); a sharded model through its root, which FSDP2 must run first
    runner = model if sharded else getattr(model, "base_model", model)
    was_training = model.training
    model.eval()
    try:
        bar = _progress(batches, progress and rank == 0)
        with torch.no_grad(), RoutingCapture(runner, moe_layers) as cap:
            seq_offset = 0
            for i, batch in enumerate(bar):
                if i % world_size != rank:  # data parallel: batch i is rank (i mod world)'s
                    seq_offset += batch["attention_mask"].shape[0]
                    continue
                mask = batch["attention_mask"].to(device)
                B, S = mask.shape
                if S == 0 or not mask.any():
                    seq_offset += B
                    continue
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
                cap.clear()
                runner(input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=position_ids,
                       use_cache=False)
                rec = cap.last
                seq_len = mask.sum(-1)
                seq_valid = (seq_len > 0).double()
                # hand the op the real tokens only: cheaper than masking padding rows inside it
                valid = mask.reshape(-1).nonzero().squeeze(1)
                keep = None if valid.numel() == B * S else valid
                seq_ids = torch.arange(B, device=device).repeat_interleave(seq_len)
                batch_halves = None if halves is None else halves[seq_offset:seq_offset + B]
                on_device = _PerDevice(keep, seq_ids)  # layers of a device_map model live on several devices
                for layer, fn in zip(moe_layers, score_fns, strict=True):
                    r = rec.layers[layer.layer_idx]
                    keep_d, seq_ids_d = on_device(r.logits.device)
                    logits, topk_idx = r.logits, r.topk_idx
                    if keep_d is not None:
                        logits, topk_idx = logits.index_select(0, keep_d), topk_idx.index_select(0, keep_d)
                    stats = ops.routing_stats(logits, top_k=layer.top_k, seq_ids=seq_ids_d, num_seqs=B,
                                              topk_idx=topk_idx, score_fn=fn)
                    accs[layer.layer_idx].add(stats, seq_valid, batch_halves)
                    if keep_token_routing:
                        token_topk[layer.layer_idx].append(topk_idx.to(torch.int16).cpu())
                num_seqs += int((seq_len > 0).sum())
                num_tokens += int(seq_len.sum())
                seq_offset += B
            if sharded:  # the ranks with fewer non-empty batches run idle passes: FSDP2 gathers in step
                for _ in range(_idle_passes(batches, rank, world_size)):
                    runner(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
            cap.clear()
    finally:
        model.train(was_training)

    rows = [accs[layer.layer_idx] for layer in moe_layers]
    if world_size > 1:  # every rank ends with the statistics of the whole data
        for a in rows:
            for t in (a.affinity_sum, a.score_sum, a.counts, a.half_sums):
                all_reduce_(t)
        totals = all_reduce_(torch.tensor([num_seqs, num_tokens], dtype=torch.int64))
        num_seqs, num_tokens = int(totals[0]), int(totals[1])
    affinity = torch.stack([a.affinity_sum for a in rows]) / num_seqs
    mean_score = torch.stack([a.score_sum for a in rows]) / num_tokens
    counts = torch.stack([a.counts for a in rows])
    result = Attribution(
        layers=[layer.layer_idx for layer in moe_layers],
        affinity=affinity.float().cpu(), frequency=(counts.double() / num_tokens).float().cpu(),
        mean_score=mean_score.float().cpu(), counts=counts.cpu(), top_k=[layer.top_k for layer in moe_layers],
        score_fns=score_fns, shared_layers=[layer.layer_idx for layer in moe_layers if layer.has_shared_experts],
        num_sequences=num_seqs, num_tokens=num_tokens, num_truncated=batches.num_truncated,
        meta={"model": _model_identity(model),
              "model_type": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
              "family": moe_layers[0].family, "max_length": batches.max_length,
              "batch_size": batches.batch_size},
    )
    from moe_unlearn.validate import check_tensor

    for name in ("affinity", "mean_score"):  # NaN/inf router weights give NaN scores: never ranked as if numbers
        check_tensor(f"the {name} the model's routers give", getattr(result, name), error=BadInputError)
    if keep_token_routing:
        result.token_topk = [torch.cat(token_topk[layer.layer_idx]) if token_topk[layer.layer_idx]
                             else torch.zeros(0, layer.top_k, dtype=torch.int16) for layer in moe_layers]
    if retain is not None:
        r = attribute_experts(model, retain, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                              progress=progress, layers=[layer.layer_idx for layer in moe_layers], device=device,
                              field=field, padding_side=padding_side, keep_token_routing=False)
        result.retain_frequency, result.retain_num_tokens = r.frequency, r.num_tokens
    if halves is not None:
        result.stability = [_topk_overlap(a.half_sums[0], a.half_sums[1], min(k, E))
                            for a, k in zip(rows, result.top_k, strict=True)]
        result.stability_seed = seed
        mean_overlap = sum(result.stability) / len(result.stability)
        if mean_overlap < LOW_STABILITY:
            warnings.warn(
                f"expert ranking is unstable: mean top-k overlap between two random halves of the data is "
                f"{mean_overlap:.2f} (< {LOW_STABILITY}); {num_tokens} tokens are too few to choose a target "
                "reliably; use more forget data (SEUF: ~100K tokens give 0.87-0.94)",
                AttributionStabilityWarning, stacklevel=2)
    return result


def _model_identity(model: nn.Module) -> dict[str, str]:
    return model_identity(model)


def _progress(batches: TokenizedBatches, enabled: bool):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=len(batches), desc="attribution", unit="batch")


__all__ = ["Attribution", "AttributionStabilityWarning", "Premise", "PremiseWarning", "SHARED_EXPERT", "TopEntry",
           "attribute_experts", "select_targets",
           "score_fn_of", "split_halves"]
