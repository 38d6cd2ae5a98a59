"""Storage maps: where a model keeps the forget knowledge, measured by ablation.

    smap = storage_map(model, tokenizer, forget=forget_records, utility=utility_records)
    smap.write("out/", "storage")          # storage.json, storage.md, storage.png
    print(smap.to_markdown())

Routing statistics (`attribute_experts`) say which experts the forget tokens pass through; they
do not say where the facts are stored. A storage map removes one component at a time and
measures what the model still knows: forget / utility exact match of QA items (answer tokens all
greedy-correct under teacher forcing), or the answer / text NLL when either side has no QA item. Components:

- embeddings; attention of each decoder layer; the shared expert of each layer; all routed
  experts of each layer; the same for the middle layers together ("middle" = the second third
  to five sixths of the layers, 2-4 of 6);
- the attributed target (highest SEUF affinity), the coverage set (`select_targets`, 0.8) and
  the top expert of each layer (by affinity on the forget data).

Each in three ways: zero (its output removed), mean (its output replaced by its mean over retain
tokens, position 0 left out of the mean: the first position's outputs are outliers, and a mean
that includes them moves every token far enough to break the layer by itself) and reinit (its
weights re-drawn as at initialisation, N(0, initializer_range), norms 1, biases 0). Each ablation
costs one forward pass over the sample. selectivity = forget drop / utility drop, the utility drop
floored at `MIN_DROP` so a harmless ablation gets a large finite value.

Attention ablation removes what the model needs to *read* a question (every fact needs it), so
a big drop there says little about storage unless utility survives it too; read the
selectivity, and for the two-phase bench models (attention never trained on the facts) read it
as reading.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_unlearn.errors import BadInputError
from moe_unlearn.validate import MAX_ITEMS, MAX_TOKENS, bounded, check_fields, check_layers

METHODS = ("zero", "mean", "reinit")
MIN_DROP = 0.01  # floor of the utility drop in selectivity
KNOWLEDGE_MIN_REMOVED = 0.5  # the targets hold the knowledge: ablating them removes >= half the forget EM ...
KNOWLEDGE_MIN_SELECTIVITY = 2.0  # ... at least twice as much as utility loses
KNOWLEDGE_MIN_NLL_RISE = 1.0  # plain texts: the forget NLL rises by >= 1 nat (and twice utility's rise)


@dataclass(frozen=True)
class Component:
    """Something to ablate. kind: embeddings | attention | shared | routed | experts.
    layers: decoder layers it spans; experts: (layer, expert) pairs of kind "experts"."""

    name: str
    kind: str
    group: str
    layers: tuple[int, ...] = ()
    experts: tuple[tuple[int, int], ...] = ()


@dataclass
class LocateConfig:
    """methods: ablations to run; sample: at most this many items per split (seeded draw);
    coverage: the share of forget tokens the coverage set must reach; middle: the layers of the
    "middle" groups (None = the default third-to-five-sixths band)."""

    methods: tuple[str, ...] = METHODS
    sample: int = bounded(96, low=1, high=MAX_ITEMS)
    batch_size: int = bounded(32, low=1, high=MAX_ITEMS)
    coverage: float = 0.8
    seed: int = bounded(0, low=0)
    middle: tuple[int, ...] | None = bounded(None, low=0, high=MAX_ITEMS)
    max_length: int = bounded(256, low=2, high=MAX_TOKENS)

    def validate(self) -> None:
        check_fields(self)  # declared types and ranges first: a "96" or a 10**12 sample fails here
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise BadInputError(f"unknown ablation method(s) {bad}; choose from {', '.join(METHODS)}")
        if self.sample < 1 or self.batch_size < 1:
            raise BadInputError("sample and batch_size must be >= 1")
        if not 0.0 < self.coverage <= 1.0:
            raise BadInputError(f"coverage must be in (0, 1], got {self.coverage}")


def middle_layers(num_layers: int) -> tuple[int, ...]:
    """The middle band of the decoder layers: [round(L/3), L - max(1, round(L/6))), never empty."""
    lo, hi = round(num_layers / 3), num_layers - max(1, round(num_layers / 6))
    return tuple(range(lo, hi)) if hi > lo else (num_layers // 2,)


def _span(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# -- the model's parts -------------------------------------------------------------------------

class ModelParts:
    """Where the ablatable modules of a model are: embeddings, attention per decoder layer, MoE blocks."""

    def __init__(self, model: nn.Module) -> None:
        from moe_unlearn.arch import find_moe_layers, unwrap_model

        self.model = unwrap_model(model)
        self.moe = {layer.layer_idx: layer for layer in find_moe_layers(self.model)}
        if not self.moe:
            raise BadInputError("the model has no sparse MoE layer; a storage map needs routed experts")
        self.embeddings = self.model.get_input_embeddings()
        modules = dict(self.model.named_modules())
        self.attention: dict[int, nn.Module] = {}
        for idx, layer in self.moe.items():
            parent = modules.get(layer.path.rsplit(".", 1)[0]) if "." in layer.path else None
            attn = next((getattr(parent, n) for n in ("self_attn", "attention", "attn") if parent is not None
                         and isinstance(getattr(parent, n, None), nn.Module)), None)
            if attn is not None:
                self.attention[idx] = attn
        self.num_layers = int(getattr(self.model.config, "num_hidden_layers", max(self.moe) + 1))
        self.init_std = float(getattr(self.model.config, "initializer_range", 0.02))

    def components(self, config: LocateConfig, attribution: Any = None) -> list[Component]:
        out = [Component("embeddings", "embeddings", "embeddings")]
        middle = tuple(config.middle) if config.middle is not None else middle_layers(self.num_layers)
        check_layers("middle", middle, self.num_layers)
        mid_attn = tuple(x for x in middle if x in self.attention)
        mid_moe = tuple(x for x in middle if x in self.moe)
        for i in sorted(self.attention):
            out.append(Component(f"attention {i}", "attention", "attention", (i,)))
        if len(mid_attn) > 1:
            out.append(Component(f"attention {_span(mid_attn)} (middle)", "attention", "attention", mid_attn))
        shared = sorted(i for i, layer in self.moe.items() if layer.has_shared_experts)
        for i in shared:
            out.append(Component(f"shared expert {i}", "shared", "shared expert", (i,)))
        for i in sorted(self.moe):
            out.append(Component(f"routed experts {i}", "routed", "routed experts", (i,)))
        if len(mid_moe) > 1:
            out.append(Component(f"routed experts {_span(mid_moe)} (middle)", "routed", "routed experts", mid_moe))
        if attribution is not None:
            from moe_unlearn.attribution import select_targets

            t = attribution.target()
            out.append(Component(f"target {t[0]}/{t[1]}", "experts", "target", (t[0],), (t,)))
            cov = [tuple(p) for p in select_targets(attribution, coverage=config.coverage, warn=False)]
            out.append(Component(f"coverage {config.coverage:g} set ({len(cov)} experts)", "experts", "coverage",
                                 tuple(sorted({lay for lay, _ in cov})), tuple(cov)))
            for i in attribution.layers:
                e = attribution.ranking(layer=i)[0].expert
                out.append(Component(f"top expert {i}/{e}", "experts", "top expert", (i,), ((i, e),)))
        return out

    # outputs of each component, given a MoE block's input -----------------------------------
    def expert_contribution(self, layer_idx: int, x: torch.Tensor, experts: Sequence[int]) -> torch.Tensor:
        """[N, H]: what routed `experts` of the layer add to the block output for tokens x [N, H]
        (routing weight times expert output where selected, else 0)."""
        layer = self.moe[layer_idx]
        routing = layer.route(x)
        out = torch.zeros_like(x)
        for e in experts:
            hit = routing.topk_idx == int(e)  # [N, K]
            rows = hit.any(-1)
            if rows.any():
                w = (routing.topk_weight * hit).sum(-1)[rows].to(x.dtype)
                out[rows] += w[:, None] * layer.expert_forward(int(e), x[rows])
        return out

    def routed_output(self, layer_idx: int, x: torch.Tensor, block_out: torch.Tensor) -> torch.Tensor:
        shared = self.moe[layer_idx].shared_output(x)
        return block_out if shared is None else block_out - shared


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


# -- hooks -------------------------------------------------------------------------------------

class _Ablation:
    """Forward hooks that zero or mean-replace one component's output (reinit changes weights)."""

    def __init__(self, parts: ModelParts, comp: Component, method: str, means: dict[str, torch.Tensor] | None) -> None:
        self.parts, self.comp, self.method, self.means = parts, comp, method, means or {}

    def _repl(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if self.method == "zero":
            return torch.zeros_like(like)
        return self.means[key].to(like.dtype).expand_as(like)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        parts, comp = self.parts, self.comp
        if self.method == "reinit":
            with _reinit(parts, comp):
                yield
            return
        handles = []
        try:
            if comp.kind == "embeddings":
                handles.append(parts.embeddings.register_forward_hook(
                    lambda m, i, o: self._repl("embeddings", o)))
            elif comp.kind == "attention":
                for i in comp.layers:
                    handles.append(parts.attention[i].register_forward_hook(
                        lambda m, inp, o, i=i: _replace_first(o, self._repl(f"attention:{i}", _first(o)))))
            else:
                for i in comp.layers:
                    handles.append(parts.moe[i].block.register_forward_hook(self._block_hook(i), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _block_hook(self, i: int):
        parts, comp = self.parts, self.comp

        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = _first(out)
            xf, yf = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            if comp.kind == "shared":
                c, key = parts.moe[i].shared_output(xf), f"shared:{i}"
                repl = self._repl(key, c)
            elif comp.kind == "routed":
                c = parts.routed_output(i, xf, yf)
                repl = self._repl(f"routed:{i}", c)
            else:
                exps = [e for lay, e in comp.experts if lay == i]
                c = parts.expert_contribution(i, xf, exps)
                repl = torch.zeros_like(c) if self.method == "zero" else \
                    sum(self.means[f"expert:{i}:{e}"] for e in exps).to(c.dtype).expand_as(c)
            return _replace_first(out, (yf - c + repl).reshape(y.shape))

        return hook


def _component_params(parts: ModelParts, comp: Component) -> list[tuple[str, nn.Parameter]]:
    if comp.kind == "embeddings":
        return list(parts.embeddings.named_parameters())
    if comp.kind == "attention":
        return [(n, p) for i in comp.layers for n, p in parts.attention[i].named_parameters()]
    if comp.kind == "shared":
        return [(n, p) for i in comp.layers for m in parts.moe[i].shared_expert_modules() for n, p in m.named_parameters()]
    if comp.kind == "routed":
        return [(n, p) for i in comp.layers for n, p in parts.moe[i].experts.named_parameters()]
    return []


@contextlib.contextmanager
def _reinit(parts: ModelParts, comp: Component) -> Iterator[None]:
    """Re-draw the component's weights (seeded), restore them on exit."""
    gen = torch.Generator().manual_seed(1234)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def draw(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.ndim == 1:
            return torch.ones_like(t) if "norm" in name else torch.zeros_like(t)
        return (torch.randn(t.shape, generator=gen) * parts.init_std).to(t.dtype)

    with torch.no_grad():
        try:
            if comp.kind == "experts":
                for lay, e in comp.experts:
                    layer = parts.moe[lay]
                    views = layer.get_expert(e)
                    for role, v in views.items():
                        saved.append((v, v.clone()))
                        v.copy_(draw(v, role if "bias" not in role else "bias").to(v.device))
            else:
                for name, p in _component_params(parts, comp):
                    saved.append((p.data, p.data.clone()))
                    p.data.copy_(draw(p.data, name).to(p.device))
            yield
        finally:
            for dst, src in reversed(saved):
                dst.copy_(src)


# -- scoring -----------------------------------------------------------------------------------

@dataclass
class _Encoded:
    ids: list[list[int]]
    starts: list[int]
    is_qa: list[bool]


def encode_sample(tokenizer: Any, items: Sequence[Any], max_length: int) -> _Encoded:
    from moe_unlearn.eval.scoring import PromptFormat, encode_items

    enc = encode_items(tokenizer, items, PromptFormat(max_length=max_length))
    return _Encoded([e.ids for e in enc], [e.target_start for e in enc], [e.is_qa for e in enc])


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


@torch.no_grad()
def score_sample(model: nn.Module, enc: _Encoded, batch_size: int, pad: int, on_batch=None) -> dict[str, float | None]:
    """EM (QA items) and mean answer / text NLL of every item; on_batch(mask) is called before each forward."""
    from moe_unlearn.eval.scoring import model_device, right_pad

    device = model_device(model)
    ems, nlls = [], []
    for rows in _batches(len(enc.ids), batch_size):
        ids, mask = right_pad([enc.ids[r] for r in rows], pad, device)
        if on_batch is not None:
            on_batch(mask)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        correct = logits.argmax(-1) == ids[:, 1:]
        for b, r in enumerate(rows):
            s, n = enc.starts[r] - 1, len(enc.ids[r]) - 1
            nlls.append(float(-logp[b, s:n].mean()))
            if enc.is_qa[r]:
                ems.append(float(bool(correct[b, s:n].all())))
    return {"em": sum(ems) / len(ems) if ems else None, "nll": sum(nlls) / len(nlls)}


@torch.no_grad()
def _means(parts: ModelParts, model: nn.Module, enc: _Encoded, batch_size: int, pad: int,
           experts: dict[int, set[int]]) -> dict[str, torch.Tensor]:
    """Mean output of every component over the real tokens of `enc`, position 0 left out."""
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    state: dict[str, torch.Tensor] = {}

    def add(key: str, out: torch.Tensor) -> None:
        sel = state["sel"]
        v = out.reshape(-1, out.shape[-1]).float()[sel].sum(0)
        sums[key] = sums[key] + v if key in sums else v

    def on_batch(mask: torch.Tensor) -> None:
        m = mask.bool().clone()
        m[:, 0] = False  # position 0 is an outlier: out of the mean
        state["sel"] = m.reshape(-1)
        count[0] += int(m.sum())

    def block_hook(i: int):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            xf, yf = x.reshape(-1, x.shape[-1]), _first(out).reshape(-1, x.shape[-1])
            shared = parts.moe[i].shared_output(xf)
            if shared is not None:
                add(f"shared:{i}", shared)
            add(f"routed:{i}", parts.routed_output(i, xf, yf))
            for e in sorted(experts.get(i, ())):
                add(f"expert:{i}:{e}", parts.expert_contribution(i, xf, [e]))
        return hook

    handles = [parts.embeddings.register_forward_hook(lambda m, i, o: add("embeddings", o))]
    for i, attn in parts.attention.items():
        handles.append(attn.register_forward_hook(lambda m, inp, o, i=i: add(f"attention:{i}", _first(o))))
    for i in parts.moe:
        handles.append(parts.moe[i].block.register_forward_hook(block_hook(i), with_kwargs=True))
    try:
        score_sample(model, enc, batch_size, pad, on_batch)
    finally:
        for h in handles:
            h.remove()
    if count[0] == 0:
        raise BadInputError("the retain sample has no token after position 0; give longer retain texts")
    return {k: (v / count[0]) for k, v in sums.items()}


def _selectivity(forget_drop: float, utility_drop: float) -> float:
    return forget_drop / max(utility_drop, MIN_DROP)


def _drop(base: dict, now: dict) -> float:
    """How much was lost: EM fall where there is EM, else NLL rise."""
    if base["em"] is not None:
        return base["em"] - now["em"]
    return now["nll"] - base["nll"]


# -- results -----------------------------------------------------------------------------------

@dataclass
class StorageMap:
    """baseline: {"forget": {"em", "nll"}, "utility": {...}}; rows: one dict per (component, method)."""

    baseline: dict[str, dict[str, float | None]]
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "em" if self.baseline["forget"]["em"] is not None else "nll"

    def row(self, component: str, method: str) -> dict[str, Any]:
        for r in self.rows:
            if r["component"] == component and r["method"] == method:
                return r
        raise KeyError(f"no row for {component!r} / {method!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": "moe-unlearn-storage-map", "version": 1, "metric": self.metric,
                "baseline": self.baseline, "rows": self.rows, "config": self.config, "meta": self.meta}

    def to_markdown(self, title: str = "Storage map") -> str:
        m = self.metric
        unit = "EM" if m == "em" else "NLL"
        b = self.baseline
        lines = [f"# {title}", "",
                 f"Original: forget {unit} {_fmt(b['forget'][m])}, utility {unit} {_fmt(b['utility'][m])}. "
                 f"Each row ablates one component (zero: output removed; mean: output replaced by its mean over "
                 f"retain tokens without position 0; reinit: weights re-drawn). selectivity = forget drop / "
                 f"utility drop (utility drop floored at {MIN_DROP}). Attention rows measure reading as much as "
                 "storage.", ""]
        ref = self.meta.get("reference")
        if ref and ref.get("forget", {}).get(m) is not None:
            lines += [f"Retrained reference ({ref['name']}, never trained on the forget facts): forget {unit} "
                      f"{_fmt(ref['forget'][m])}, utility {unit} {_fmt(ref['utility'][m])}.", ""]
        chk = self.meta.get("implant_check")
        if chk:
            lines += ["Implant check (ablating the implant expert gives the reference within "
                      f"{chk['tolerance']} EM): " + "; ".join(
                          f"{k}: forget gap {v['forget_gap']:.3f}, utility gap {v['utility_gap']:.3f} -> "
                          f"{'passes' if v['passes'] else 'FAILS'}" for k, v in chk.items() if k != "tolerance"), ""]
        methods = [x for x in METHODS if any(r["method"] == x for r in self.rows)]
        lines.append("| component | " + " | ".join(f"{x}: forget / utility / sel." for x in methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for comp in dict.fromkeys(r["component"] for r in self.rows):
            cells = []
            for x in methods:
                try:
                    r = self.row(comp, x)
                except KeyError:
                    cells.append("")
                    continue
                cells.append(f"{_fmt(r['forget'][m])} / {_fmt(r['utility'][m])} / {_fmt(r['selectivity'], 2)}")
            lines.append(f"| {comp} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike, title: str = "Storage map") -> None:
        """One heatmap: components x (method, forget/utility), cell = the metric after ablation."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        m = self.metric
        comps = list(dict.fromkeys(r["component"] for r in self.rows))
        methods = [x for x in METHODS if any(r["method"] == x for r in self.rows)]
        cols = [(x, s) for x in methods for s in ("forget", "utility")]
        grid = torch.full((len(comps), len(cols)), float("nan"))
        for r in self.rows:
            for s in ("forget", "utility"):
                v = r[s][m]
                grid[comps.index(r["component"]), cols.index((r["method"], s))] = float("nan") if v is None else v
        fig, ax = plt.subplots(figsize=(2 + 1.1 * len(cols), 1 + 0.32 * len(comps)))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis" if m == "em" else "magma_r",
                       vmin=0.0 if m == "em" else None, vmax=1.0 if m == "em" else None)
        ax.set_xticks(range(len(cols)), [f"{x}\n{s}" for x, s in cols], fontsize=8)
        ax.set_yticks(range(len(comps)), comps, fontsize=7)
        for (i, j), v in _cells(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
        fig.colorbar(im, ax=ax, label=f"{'exact match' if m == 'em' else 'NLL'} after ablation")
        b = self.baseline
        ax.set_title(f"{title}\noriginal forget {_fmt(b['forget'][m])}, utility {_fmt(b['utility'][m])}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self, out_dir: str | os.PathLike, stem: str = "storage_map", title: str = "Storage map") -> list[Path]:
        """JSON, markdown and the heatmap, all or none (staged, then moved in)."""
        from moe_unlearn.atomic import staged_files

        names = (f"{stem}.json", f"{stem}.md", f"{stem}.png")
        out = Path(out_dir)
        with staged_files(out, owned=names) as tmp:
            (tmp / names[0]).write_text(json.dumps(self.to_dict(), indent=1))
            (tmp / names[1]).write_text(self.to_markdown(title))
            self.plot(tmp / names[2], title)
        return [out / n for n in names]


def _cells(grid: torch.Tensor):
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = float(grid[i, j])
            if not math.isnan(v):
                yield (i, j), v


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# -- API ---------------------------------------------------------------------------------------

def draw_sample(items: list, n: int, seed: int) -> list:
    if len(items) <= n:
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def read_items(data: Any, name: str) -> list:
    from moe_unlearn.eval.items import as_items

    return as_items(data, name)


def storage_map(model: nn.Module, tokenizer: Any, forget: Any, utility: Any, *, retain: Any = None,
                config: LocateConfig | None = None, components: Sequence[Component] | None = None,
                attribution: Any = None, progress: bool = True) -> StorageMap:
    """Ablate each component (see the module docstring) and measure forget / utility knowledge.

    forget / utility / retain: lists of records ({question, answer} or {text}), paths or datasets
    (what `moe_unlearn.eval` reads). retain (default: utility) gives the ablation means.
    attribution: an `Attribution` of the forget data on this model for the target / coverage / top
    expert rows (computed here when None and `components` is None). The model's weights are
    restored after every re-initialisation."""
    from tqdm.auto import tqdm

    from moe_unlearn.eval.scoring import pad_token_id

    config = config or LocateConfig()
    config.validate()
    parts = ModelParts(model)
    f_items = draw_sample(read_items(forget, "forget"), config.sample, config.seed)
    u_items = draw_sample(read_items(utility, "utility"), config.sample, config.seed + 1)
    r_items = draw_sample(read_items(retain, "retain"), config.sample, config.seed + 2) if retain is not None else u_items
    enc = {k: encode_sample(tokenizer, v, config.max_length) for k, v in
           (("forget", f_items), ("utility", u_items), ("retain", r_items))}
    if not (any(enc["forget"].is_qa) and any(enc["utility"].is_qa)):  # EM needs QA on both sides: else NLL
        for k in ("forget", "utility"):
            enc[k].is_qa = [False] * len(enc[k].ids)
    if components is None:
        if attribution is None:
            from moe_unlearn.attribution import attribute_experts

            attribution = attribute_experts(model, [item_text(i) for i in f_items], tokenizer=tokenizer,
                                            batch_size=config.batch_size, progress=False,
                                            retain=[item_text(i) for i in r_items])
        components = parts.components(config, attribution)
    bad = [c.name for c in components for i in c.layers if (c.kind == "attention" and i not in parts.attention)
           or (c.kind in ("shared", "routed", "experts") and i not in parts.moe)]
    if bad:
        raise BadInputError(f"components {bad} name layers the model does not have")
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        needed: dict[int, set[int]] = {}
        for c in components:
            for lay, e in c.experts:
                needed.setdefault(lay, set()).add(int(e))
        means = _means(parts, model, enc["retain"], config.batch_size, pad, needed) if "mean" in config.methods \
            else None
        base = {s: score_sample(model, enc[s], config.batch_size, pad) for s in ("forget", "utility")}
        rows = []
        jobs = [(c, m) for c in components for m in config.methods]
        for comp, method in tqdm(jobs, desc="storage map", disable=not progress):
            with _Ablation(parts, comp, method, means).active():
                res = {s: score_sample(model, enc[s], config.batch_size, pad) for s in ("forget", "utility")}
            rows.append({"component": comp.name, "group": comp.group, "kind": comp.kind, "layers": list(comp.layers),
                         "experts": [list(p) for p in comp.experts], "method": method, **res,
                         "selectivity": _selectivity(_drop(base["forget"], res["forget"]),
                                                     _drop(base["utility"], res["utility"]))})
    finally:
        model.train(was_training)
    meta = {"num_items": {k: len(v.ids) for k, v in enc.items()}, "middle_layers": list(
        config.middle if config.middle is not None else middle_layers(parts.num_layers))}
    return StorageMap(baseline=base, rows=rows, config=asdict(config), meta=meta)


def item_text(item: Any) -> str:
    if item.is_qa:
        return f"Question: {item.question}\nAnswer: {item.answer}"
    return item.text


@dataclass(frozen=True)
class KnowledgeCheck:
    """Forget / utility knowledge with the targets zero-ablated. holds: ablating them removes at least
    KNOWLEDGE_MIN_REMOVED of the forget EM (plain texts: the NLL rises by KNOWLEDGE_MIN_NLL_RISE) and
    does so with selectivity >= KNOWLEDGE_MIN_SELECTIVITY."""

    metric: str
    forget_before: float
    forget_after: float
    utility_before: float
    utility_after: float
    selectivity: float

    @property
    def holds(self) -> bool:
        if self.selectivity < KNOWLEDGE_MIN_SELECTIVITY:
            return False
        if self.metric == "em":
            return self.forget_before - self.forget_after >= KNOWLEDGE_MIN_REMOVED * self.forget_before > 0
        return self.forget_after - self.forget_before >= KNOWLEDGE_MIN_NLL_RISE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "holds": self.holds}

    def not_held_message(self, targets: Sequence[Any], extra: str = "") -> str:
        """The PremiseWarning text for targets that do not hold the forget knowledge (one wording for the
        premise check and the unlearn command)."""
        unit = "EM" if self.metric == "em" else "NLL"
        return (f"targets {list(targets)} do not hold the forget knowledge: zeroing them moves forget {unit} "
                f"{self.forget_before:.3f} -> {self.forget_after:.3f} and utility {unit} "
                f"{self.utility_before:.3f} -> {self.utility_after:.3f}{extra}. Unlearning them alone can hide the "
                "facts (routing away) rather than erase them; see `moe-unlearn locate` for where the knowledge is.")


def knowledge_check(model: nn.Module, tokenizer: Any, forget: Any, utility: Any, targets: Sequence[Any], *,
                    sample: int = 64, batch_size: int = 32) -> KnowledgeCheck:
    """Do the routed experts `targets` ((layer, expert) pairs) hold the forget knowledge? Zeroes them
    and measures forget / utility (EM of QA items, else NLL): three forward passes over the samples."""
    from moe_unlearn.arch import ExpertTarget

    pairs = []
    for t in targets:
        et = ExpertTarget.coerce(t)
        if et.shared:
            raise BadInputError("the knowledge check ablates routed experts; a shared expert is not one")
        pairs.append((et.layer, int(et.expert)))
    comp = Component("targets", "experts", "target", tuple(sorted({lay for lay, _ in pairs})), tuple(pairs))
    smap = storage_map(model, tokenizer, forget, utility, components=[comp],
                       config=LocateConfig(methods=("zero",), sample=sample, batch_size=batch_size), progress=False)
    m, r = smap.metric, smap.rows[0]
    return KnowledgeCheck(metric=m, forget_before=smap.baseline["forget"][m], forget_after=r["forget"][m],
                          utility_before=smap.baseline["utility"][m], utility_after=r["utility"][m],
                          selectivity=r["selectivity"])


def knowledge_premise(attribution: Any, targets: Sequence[Any] | None, model: nn.Module, tokenizer: Any, forget: Any,
                      utility: Any, *, warn: bool = True, sample: int = 64) -> Any:
    """`attribution.premise(targets)` with the knowledge measured (`knowledge_check`): its verdict then
    follows the knowledge, and it warns (PremiseWarning) when the targets do not hold the forget knowledge."""
    pairs = [tuple(t) for t in targets] if targets is not None else [attribution.target()]
    kc = knowledge_check(model, tokenizer, forget, utility, pairs, sample=sample)
    return attribution.premise(pairs, warn=warn, knowledge=kc)


__all__ = ["METHODS", "Component", "KnowledgeCheck", "LocateConfig", "StorageMap", "knowledge_check",
           "knowledge_premise", "middle_layers", "storage_map"]
