"""Fusing adapters learned for different forget requests into one (EUL's regression merge).

Adapters for requests 1..k, each trained from the same base model (not stacked), change a matrix
by dW_i [out, in]; request i's data gave the matrix the inputs X_i. The fused change is the one
that reproduces every adapter's outputs on its own inputs, in the least-squares sense:

    min_W  sum_i ||X_i W^T - X_i dW_i^T||^2   =>   W = (sum_i dW_i G_i) (sum_i G_i + lambda I)^-1,

G_i = X_i^T X_i (forget inputs, plus `retain_weight` times retain inputs), with its off-diagonal
scaled by `alpha` (G_i <- alpha G_i + (1 - alpha) diag(G_i); RegMean's regularisation, Jin et al.
2023, whose merge EUL's fusion is; alpha = 0.9 is RegMean's default, alpha = 1 is the plain
regression). Without it the exact solution fits each request's inputs by large components in
directions where those inputs have little energy, and inputs the requests never saw (utility
data) meet those components. The Gram matrices are
stored with each adapter patch (moe_unlearn.unlearning.adapters), so fusion needs no data. For
low-rank adapters the result is exactly low rank, sum_i B_i (A_i G_i M^-1), M = sum_i G_i +
lambda I: the fused patch stores the concatenated factors (rank sum_i r_i). A fully trained
matrix (the router, by default) is fused the same way from its stored values. lambda = `ridge`
x trace(sum_i G_i) / in: it only matters in directions no request's data reached, where it
keeps the change at zero. A tensor without Gram statistics (a bias) gets the mean of the
changes; a matrix only one request changed keeps that request's change.

The fused patch is an ordinary patch of the base model (apply / revert bit-exactly, sha256 of
every value) and carries the summed Gram statistics, so it can be fused again. The inputs are
put in a canonical order first: fuse_patches([p1, p2]) and fuse_patches([p2, p1]) write the same
patch, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.atomic import check_out_dir
from moe_unlearn.errors import BadInputError, PatchError
from moe_unlearn.unlearning.adapters import (
    MatrixLayout,
    gram_factor,
    lowrank_delta,
    lowrank_value,
    router_layout,
)
from moe_unlearn.unlearning.patch import (
    PatchEntry,
    config_hash,
    entry_layout,
    entry_parts,
    load_patch,
    tensor_hash,
    write_patch,
)


def _gram(parts: dict[str, torch.Tensor], retain_weight: float, alpha: float = 1.0) -> torch.Tensor:
    f, r = parts["gram_forget"].double(), parts["gram_retain"].double()
    g = f @ f.T + retain_weight * (r @ r.T)
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def _delta(m: dict[str, Any], parts: dict[str, torch.Tensor], layout: MatrixLayout) -> torch.Tensor:
    """dW [out, in] float64 of one entry."""
    if m.get("kind", "values") == "lowrank":
        return lowrank_delta(parts["a"], parts["b"])
    return layout.matrix(parts["new"]).double() - layout.matrix(parts["orig"]).double()


def _layout_of(m: dict[str, Any], parts: dict[str, torch.Tensor], hidden_size: int) -> MatrixLayout | None:
    if m.get("kind", "values") == "lowrank":
        return entry_layout(m)
    t = parts["orig"]
    if t.dim() == 2 and m.get("gram") is not None:
        return router_layout(t, hidden_size)
    return None


def regression_merge(deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], ridge: float = 0.0
                     ) -> torch.Tensor:
    """argmin_W sum_i ||X_i W^T - X_i dW_i^T||^2 (+ lambda ||W||^2) from the Grams G_i = X_i^T X_i:
    W = (sum_i dW_i G_i)(sum_i G_i + lambda I)^-1, lambda = ridge * trace(sum G) / in. float64."""
    m = _normal_matrix(grams, ridge)
    rhs = sum(dw.double() @ g.double() for dw, g in zip(deltas, grams, strict=True))
    return torch.linalg.solve(m, rhs.T).T  # M symmetric: (M^-1 rhs^T)^T = rhs M^-1


def _normal_matrix(grams: Sequence[torch.Tensor], ridge: float) -> torch.Tensor:
    """M = sum_i G_i + lambda I, lambda = ridge * trace(sum G) / in (float64)."""
    total = sum(g.double() for g in grams)
    d = total.shape[0]
    return total + ridge * float(torch.trace(total)) / d * torch.eye(d, dtype=torch.float64)


def _canonical(loaded: list[tuple[Path, dict[str, Any], dict[str, torch.Tensor]]]):
    """The patches in an order that depends only on their contents."""
    def key(item):
        meta = item[1]
        ident = [[e["name"], e["dim"], e["start"], e.get("factor_sha256") or e["new_sha256"]] for e in meta["entries"]]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return sorted(loaded, key=key)


@torch.no_grad()
def fuse_patches(model: nn.Module, patches: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 ridge: float = 1e-6, retain_weight: float = 1.0, alpha: float = 0.9) -> Path:
    """Merge adapter patches, each made from `model`'s current (base) weights, into one patch in
    `out_dir` (module docstring). The model is read, never changed; every patch is checked (sha256
    of every stored tensor, base model, the model holding each entry's original values) before
    anything is computed. Refused: fewer than two patches, a patch without Gram statistics (not made
    with adapter=...), patches of different base values for one tensor (stacked, not independent)."""
    from moe_unlearn.validate import check_number

    check_number("ridge", ridge, low=0.0)
    check_number("retain_weight", retain_weight, low=0.0)
    check_number("alpha", alpha, low=0.0, high=1.0)
    if len(patches) < 2:
        raise BadInputError(f"fuse_patches needs at least two patches, got {len(patches)}")
    out_path = check_out_dir(Path(out_dir), model_dirs=(), must_be_empty=True, what="out_dir")
    loaded = []
    for p in patches:
        meta, tensors = load_patch(p)
        if meta["base_model"]["config_hash"] != config_hash(model):
            raise PatchError(f"patch {p} was made for a different model (config hash differs)")
        if not any(m.get("gram") is not None for m in meta["entries"]):
            raise BadInputError(f"patch {p} holds no Gram statistics: only patches made with adapter='lora' can be "
                                "fused (full-slice patches can only be stacked)")
        loaded.append((Path(p), meta, tensors))
    loaded = _canonical(loaded)
    params = canonical_parameters(model)
    hidden = model.config.hidden_size
    groups: dict[tuple, list[tuple[dict[str, Any], dict[str, torch.Tensor]]]] = {}
    for _path, meta, tensors in loaded:
        for i, m in enumerate(meta["entries"]):
            groups.setdefault((m["name"], m["dim"], m["start"], m["stop"]), []).append(
                (m, entry_parts(meta, tensors, i)))
    entries, originals, values, lowrank, grams = [], [], [], {}, {}
    for idx, (key, items) in enumerate(groups.items()):
        e = PatchEntry(*key)
        view = e.view(params)
        m0 = items[0][0]
        if any(m["orig_sha256"] != m0["orig_sha256"] for m, _ in items):
            raise PatchError(f"{e.name}: the patches were made from different values of it (stacked requests?); "
                             "fuse_patches merges adapters each trained from the same base model")
        if tensor_hash(view) != m0["orig_sha256"]:
            raise PatchError(f"{e.name}: the model does not hold the base values the patches were made from; "
                             "fuse on the base model (revert applied patches first)")
        orig = view.detach().cpu().clone()
        entries.append(e)
        originals.append(orig)
        layouts = [_layout_of(m, parts, hidden) for m, parts in items]
        with_gram = all(m.get("gram") is not None for m, _ in items) and all(lay is not None for lay in layouts)
        if len(items) == 1 or not with_gram:
            if len(items) > 1 and not all(m.get("kind", "values") == "values" for m, _ in items):
                raise PatchError(f"{e.name}: a low-rank entry without Gram statistics cannot be fused")
            if len(items) == 1 and items[0][0].get("kind", "values") == "lowrank":
                m, parts = items[0]
                lowrank[idx] = {"a": parts["a"], "b": parts["b"], "layout": entry_layout(m)}
                values.append(lowrank_value(orig, entry_layout(m), parts["a"], parts["b"]))
            else:  # one request's values, or (no Gram: a bias) the mean of the changes
                mean = sum(p["new"].double() - p["orig"].double() for _, p in items) / len(items)
                values.append((orig.double() + mean).to(orig.dtype))
            if len(items) == 1 and items[0][0].get("gram") is not None:
                g = items[0][1]
                grams[idx] = {"forget": g["gram_forget"], "retain": g["gram_retain"],
                              **{f"{k}_{q}": items[0][0]["gram"][f"{k}_{q}"] for k in ("forget", "retain")
                                 for q in ("tokens", "energy")}}
            continue
        layout = layouts[0]
        gs = [_gram(parts, retain_weight, alpha) for _, parts in items]
        msys = _normal_matrix(gs, ridge)
        if all(m.get("kind", "values") == "lowrank" for m, _ in items):
            # sum_i B_i A_i G_i M^-1: factors [B_1 .. B_k], [A_1 G_1 M^-1; ..; A_k G_k M^-1]
            a = torch.cat([torch.linalg.solve(msys, g @ parts["a"].double().T).T for (_, parts), g
                           in zip(items, gs, strict=True)]).float()
            b = torch.cat([parts["b"].double() for _, parts in items], dim=1).float()
            lowrank[idx] = {"a": a.contiguous(), "b": b.contiguous(), "layout": layout}
            out = lowrank_value(orig, layout, a, b)
        else:
            fused = regression_merge([_delta(m, parts, layout) for m, parts in items], gs, ridge)
            out = orig.clone()
            layout.matrix(out).copy_((layout.matrix(orig).double() + fused).to(orig.dtype))
        values.append(out)
        rec: dict[str, Any] = {}
        for kind in ("forget", "retain"):
            fs = [parts[f"gram_{kind}"].double() for _, parts in items]
            rec[kind], rec[f"{kind}_energy"] = gram_factor(sum(f @ f.T for f in fs), max(f.shape[1] for f in fs)
                                                           * len(fs))
            rec[f"{kind}_tokens"] = sum(m["gram"][f"{kind}_tokens"] for m, _ in items)
        grams[idx] = rec
    info = {"method": "fused", "scope": "fused", "targets": sorted({t for _, meta, _ in loaded
                                                                    for t in meta.get("targets", [])}),
            "fused_from": [{"path": str(path), "method": meta.get("method"), "targets": meta.get("targets"),
                            "hyperparameters": meta.get("hyperparameters")} for path, meta, _ in loaded],
            "fusion": {"ridge": ridge, "retain_weight": retain_weight, "alpha": alpha, "patches": len(loaded)}}
    return write_patch(out_path, model, entries, originals, info, lowrank=lowrank, grams=grams, values=values)


__all__ = ["fuse_patches", "regression_merge"]
