"""Unlearning patches: exactly the changed tensors / slices, reversible bit-exactly.

A patch is a directory with
- patch.safetensors: per entry i either its values, `new.<i>` and `orig.<i>` (after and before),
  or, for a low-rank entry (adapter="lora", see moe_unlearn.unlearning.adapters), its factors
  `a.<i>` [r, in] and `b.<i>` [out, r] and the few elements `fix_index.<i>` / `fix_value.<i>` that
  make revert bit-exact; adapter patches also hold `gram_forget.<i>` / `gram_retain.<i>`, factors
  of the Gram matrices of the entry's inputs (what `fuse_patches` merges with);
- patch.json: format tag, base-model identity (name_or_path, config hash), the entries
  (parameter name, dim/start/stop of the slice or null for a whole tensor, shape, dtype,
  sha256 of the original and new values), and what produced it (method, scope, targets,
  hyperparameters, final loss terms).

`apply_patch` checks that the model is the base model and that every entry currently holds
the original values (so patches from sequential requests must be applied in order); a low-rank
entry's new values are computed from the factors and checked against the recorded sha256;
`revert_patch` checks that it holds the new values and writes the originals back. Both check
the patch itself first: every field of patch.json, and every stored tensor against the shape,
dtype and sha256 recorded for it (a tampered, truncated or mixed-up file is refused, never
applied or broadcast), all before the first write; a write that still fails puts the values
already written back, so the model is never left half-patched.
Entry names are those of the bare transformers model (`arch.wrappers.canonical_name`), so a
patch made on a PEFT- or DDP-wrapped model applies to the stock model and the other way round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_unlearn.arch.wrappers import canonical_parameters
from moe_unlearn.atomic import atomic_dir
from moe_unlearn.errors import BadInputError, PatchError, TrainingDiverged
from moe_unlearn.identity import config_hash, model_identity, tensor_hash
from moe_unlearn.unlearning.adapters import MatrixLayout, lowrank_revert, lowrank_value, revert_fixes
from moe_unlearn.unlearning.tensor import TrainedTensor

FORMAT = "moe-unlearn-patch"
VERSION = 1
TENSORS_FILE = "patch.safetensors"
META_FILE = "patch.json"
PatchEntry = TrainedTensor  # an entry of a patch: the trained tensor it changed


def snapshot(model: nn.Module, entries: list[PatchEntry]) -> list[torch.Tensor]:
    """CPU copies of the entries' current values (the originals, taken before training)."""
    params = canonical_parameters(model)
    return [e.view(params).detach().cpu().clone() for e in entries]


def write_patch(out_dir: str | os.PathLike, model: nn.Module, entries: list[PatchEntry],
                originals: list[torch.Tensor], info: dict[str, Any], *,
                lowrank: dict[int, dict[str, Any]] | None = None,
                grams: dict[int, dict[str, Any]] | None = None,
                values: list[torch.Tensor] | None = None) -> Path:
    """Write the patch of `entries` (current model values vs `originals`) into `out_dir`, atomically.
    Entries whose values did not change are still written (they were in scope).
    lowrank: {entry index: {"a", "b", "layout"}} entries stored as factors (the model must hold
    exactly lowrank_apply(original)); grams: {entry index: {"forget", "retain" (factors [in, k]),
    "forget_tokens", "retain_tokens", "forget_energy", "retain_energy"}}; values: the new values of the
    entries when they are not the model's current ones (fuse_patches)."""
    params = canonical_parameters(model)
    lowrank, grams = lowrank or {}, grams or {}
    tensors: dict[str, torch.Tensor] = {}
    meta_entries = []
    for i, (e, orig) in enumerate(zip(entries, originals, strict=True)):
        new = (values[i] if values is not None else e.view(params)).detach().cpu().contiguous().clone()
        if new.is_floating_point() and not bool(torch.isfinite(new).all()):
            raise TrainingDiverged(f"{e.name} holds NaN/inf values after unlearning; nothing was written")
        m = {"name": e.name, "dim": e.dim, "start": e.start, "stop": e.stop, "shape": list(new.shape),
             "dtype": str(new.dtype).removeprefix("torch."), "orig_sha256": tensor_hash(orig),
             "new_sha256": tensor_hash(new)}
        if i in lowrank:
            lr = lowrank[i]
            layout: MatrixLayout = lr["layout"]
            a, b = lr["a"].detach().cpu().float().contiguous(), lr["b"].detach().cpu().float().contiguous()
            if tensor_hash(lowrank_value(orig, layout, a, b)) != m["new_sha256"]:
                raise PatchError(f"{e.name}: the model does not hold W0 + B A of its factors; nothing was written")
            fix_index, fix_value = revert_fixes(layout.matrix(orig), a, b)
            parts = {"a": a, "b": b, "fix_index": fix_index, "fix_value": fix_value}
            tensors.update({f"{k}.{i}": v for k, v in parts.items()})
            m.update(kind="lowrank", rank=int(a.shape[0]), layout=layout.to_dict(), fixes=int(fix_index.numel()),
                     factor_sha256={k: tensor_hash(v) for k, v in parts.items()})
        else:
            tensors[f"new.{i}"] = new
            tensors[f"orig.{i}"] = orig.contiguous()
        if i in grams:
            g = grams[i]
            gparts = {k: g[k].detach().cpu().float().contiguous() for k in ("forget", "retain")}
            tensors.update({f"gram_{k}.{i}": v for k, v in gparts.items()})
            m["gram"] = {"in_features": int(gparts["forget"].shape[0]),
                         **{f"{k}_{q}": g[f"{k}_{q}"] for k in ("forget", "retain") for q in ("tokens", "energy")},
                         "sha256": {k: tensor_hash(v) for k, v in gparts.items()}}
        meta_entries.append(m)
    meta = {"format": FORMAT, "version": VERSION, "base_model": model_identity(model), "entries": meta_entries,
            **info}

    out = Path(out_dir)
    with atomic_dir(out) as tmp:  # an existing out_dir can only be empty here (checked by the caller)
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    return out


def _lowrank_original(current: torch.Tensor, layout: MatrixLayout, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    out = current.detach().cpu().clone()
    layout.matrix(out).copy_(lowrank_revert(layout.matrix(current.detach().cpu()), parts["a"], parts["b"],
                                            parts["fix_index"], parts["fix_value"]))
    return out


def _patch_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / META_FILE).is_file() or not (p / TENSORS_FILE).is_file():
        raise BadInputError(f"{path} is not an unlearning patch (expected {META_FILE} and {TENSORS_FILE})")
    return p


def read_patch_meta(path: str | os.PathLike) -> dict[str, Any]:
    """patch.json of a patch, with every field the patch functions use checked (PatchError otherwise)."""
    from moe_unlearn.validate import check_regular_file, read_json_file

    d = _patch_dir(path)
    check_regular_file(d / TENSORS_FILE, what="patch file", error=BadInputError)
    meta = read_json_file(d / META_FILE, what="patch file", error=BadInputError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadInputError(f"{d / META_FILE} is not a moe-unlearn patch (format tag missing)")
    _check_meta(meta, d / META_FILE)
    return meta


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    def bad(what: str) -> PatchError:
        return PatchError(f"{where} is malformed: {what}; the patch is damaged, rewrite it with unlearn()")

    if meta.get("version") != VERSION:
        raise bad(f"version {meta.get('version')!r}, this library reads version {VERSION}")
    base = meta.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("config_hash"), str):
        raise bad("base_model.config_hash missing")
    entries = meta.get("entries")
    if not isinstance(entries, list) or not entries:
        raise bad("entries must be a non-empty list")
    seen = set()
    for i, m in enumerate(entries):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise bad(f"entry {i} has no parameter name")
        dim, start, stop = m.get("dim"), m.get("start"), m.get("stop")
        if dim is None:
            if start is not None or stop is not None:
                raise bad(f"entry {i} ({m['name']}): start/stop without dim")
        elif not all(isinstance(v, int) and not isinstance(v, bool) for v in (dim, start, stop)) or not (
                dim >= 0 and 0 <= start < stop):
            raise bad(f"entry {i} ({m['name']}): dim/start/stop must be integers with dim >= 0, 0 <= start < stop")
        shape = m.get("shape")
        if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in shape):
            raise bad(f"entry {i} ({m['name']}): shape must be a list of non-negative integers")
        if not isinstance(m.get("dtype"), str) or not isinstance(getattr(torch, m["dtype"], None), torch.dtype):
            raise bad(f"entry {i} ({m['name']}): unknown dtype {m.get('dtype')!r}")
        for key in ("orig_sha256", "new_sha256"):
            h = m.get(key)
            if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise bad(f"entry {i} ({m['name']}): {key} is not a sha256 hex digest")
        kind = m.get("kind", "values")
        if kind not in ("values", "lowrank"):
            raise bad(f"entry {i} ({m['name']}): unknown kind {kind!r}")
        if kind == "lowrank":
            lay = m.get("layout")
            r = m.get("rank")
            if (not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(lay, dict)
                    or lay.get("in_axis") not in (0, 1) or lay.get("squeeze") not in (None, 0, 1, 2)):
                raise bad(f"entry {i} ({m['name']}): low-rank entry needs a rank >= 1 and a layout")
            if not isinstance(m.get("factor_sha256"), dict) or set(m["factor_sha256"]) != set(_FACTORS):
                raise bad(f"entry {i} ({m['name']}): factor_sha256 must name {', '.join(_FACTORS)}")
        g = m.get("gram")
        if g is not None and (not isinstance(g, dict) or not isinstance(g.get("sha256"), dict)
                              or set(g["sha256"]) != {"forget", "retain"}):
            raise bad(f"entry {i} ({m['name']}): gram statistics without their sha256")
        key = (m["name"], dim, start, stop)
        if key in seen:
            raise bad(f"entry {i} ({m['name']}) appears twice")
        seen.add(key)


_FACTORS = ("a", "b", "fix_index", "fix_value")


def _stored(meta: dict[str, Any]) -> dict[str, tuple[int, str, str | None]]:
    """{tensor key: (entry index, part, recorded sha256)} of every tensor patch.json says is stored;
    value parts are also checked against the entry's shape and dtype."""
    want: dict[str, tuple[int, str, str | None]] = {}
    for i, m in enumerate(meta["entries"]):
        if m.get("kind", "values") == "lowrank":
            want.update({f"{k}.{i}": (i, k, m["factor_sha256"][k]) for k in _FACTORS})
        else:
            want.update({f"{k}.{i}": (i, k, m[f"{k}_sha256"]) for k in ("orig", "new")})
        if m.get("gram") is not None:
            want.update({f"gram_{k}.{i}": (i, f"gram_{k}", m["gram"]["sha256"][k]) for k in ("forget", "retain")})
    return want


def _load_tensors(d: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The stored tensors, each checked against the shape, dtype and hash patch.json records for it."""
    try:
        tensors = load_file(str(d / TENSORS_FILE))
    except Exception as exc:  # safetensors raises its own error type on a truncated or garbled file
        raise PatchError(f"cannot read {d / TENSORS_FILE} ({' '.join(str(exc).split())[:200]}); the patch is "
                         "damaged") from None
    want = _stored(meta)
    if set(tensors) != set(want):
        raise PatchError(f"{d / TENSORS_FILE} holds tensors {sorted(set(tensors) ^ set(want))[:4]} that do not match "
                         f"{META_FILE}'s {len(meta['entries'])} entries; the patch is damaged")
    for key, (i, part, sha) in want.items():
        m, t = meta["entries"][i], tensors[key]
        if part in ("orig", "new") and (list(t.shape) != m["shape"]
                                        or str(t.dtype).removeprefix("torch.") != m["dtype"]):
            raise PatchError(f"{m['name']}: the stored {part} tensor is {tuple(t.shape)} {t.dtype}, "
                             f"{META_FILE} records {tuple(m['shape'])} {m['dtype']}; the patch is damaged")
        if tensor_hash(t) != sha:
            raise PatchError(f"{m['name']}: the stored {part} values do not match their sha256 in {META_FILE}; "
                             "the patch was modified or damaged and is not applied")
    for i, m in enumerate(meta["entries"]):
        _check_entry_tensors(m, entry_parts(meta, tensors, i), d / TENSORS_FILE)
    return tensors


def _matrix_shape(m: dict[str, Any]) -> tuple[int, int] | None:
    """[out, in] of an entry's matrix as its layout reads its shape, or None when the layout does not fit."""
    shape = list(m["shape"])
    squeeze, in_axis = m["layout"]["squeeze"], m["layout"]["in_axis"]
    if squeeze is not None:
        if squeeze >= len(shape) or shape[squeeze] != 1:
            return None
        del shape[squeeze]
    if len(shape) != 2:
        return None
    return (shape[0], shape[1]) if in_axis == 1 else (shape[1], shape[0])


def _check_entry_tensors(m: dict[str, Any], parts: dict[str, torch.Tensor], where: Path) -> None:
    """Numbers, not just bytes: every stored tensor of an entry finite and of the shape its role needs (factors
    [r, in] and [out, r], fix indices inside the matrix, Gram factors [in, k]), so nothing downstream meets a
    NaN, an IndexError or a shape error. A hash re-recorded over damaged values does not get past this."""
    from moe_unlearn.validate import check_tensor

    name = m["name"]

    def check(part: str, **kw: Any) -> torch.Tensor:
        return check_tensor(f"{name}: the stored {part} tensor of {where}", parts[part], error=PatchError, **kw)

    for part in parts:
        check(part)  # finite
    dtype = getattr(torch, m["dtype"])
    if m.get("kind", "values") == "lowrank":
        shape = _matrix_shape(m)
        if shape is None:
            raise PatchError(f"{name}: layout {m['layout']} does not fit the entry's shape {m['shape']} in "
                             f"{where.parent / META_FILE}; the patch is damaged")
        out_f, in_f = shape
        r = m["rank"]
        check("a", shape=(r, in_f), dtypes=(torch.float32,))
        check("b", shape=(out_f, r), dtypes=(torch.float32,))
        idx = check("fix_index", shape=(None,), dtypes=(torch.int32, torch.int64))
        check("fix_value", shape=(idx.numel(),), dtypes=(dtype,))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= out_f * in_f):
            raise PatchError(f"{name}: the stored fix indices of {where} reach outside its {out_f} x {in_f} matrix; "
                             "the patch is damaged")
    g = m.get("gram")
    if g is not None:
        in_f = g.get("in_features")
        if not isinstance(in_f, int) or isinstance(in_f, bool) or in_f < 1:
            raise PatchError(f"{name}: gram.in_features must be a positive integer in {where.parent / META_FILE}")
        if in_f not in m["shape"] or (m.get("kind", "values") == "lowrank" and _matrix_shape(m)[1] != in_f):
            raise PatchError(f"{name}: Gram factors of {in_f} inputs do not fit its shape {m['shape']}; the patch "
                             "is damaged")
        for k in ("forget", "retain"):
            check(f"gram_{k}", shape=(in_f, None), dtypes=(torch.float32,))
            tokens, energy = g.get(f"{k}_tokens"), g.get(f"{k}_energy")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0 or isinstance(energy, bool) or (
                    not isinstance(energy, (int, float)) or not 0.0 <= energy <= 1.0 + 1e-6):
                raise PatchError(f"{name}: gram.{k}_tokens / {k}_energy in {where.parent / META_FILE} must be a "
                                 "token count and a share in [0, 1]; the patch is damaged")


def entry_parts(meta: dict[str, Any], tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The stored tensors of entry i, by part name (orig/new, or a/b/fix_index/fix_value; gram_*)."""
    suffix = f".{i}"
    return {k[:-len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}


def entry_layout(m: dict[str, Any]) -> MatrixLayout:
    return MatrixLayout(m["layout"]["squeeze"], m["layout"]["in_axis"])


def load_patch(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(patch.json, the checked stored tensors) of a patch."""
    meta = read_patch_meta(path)
    return meta, _load_tensors(_patch_dir(path), meta)


def _swap(model: nn.Module, path: str | os.PathLike, *, forward: bool) -> dict[str, Any]:
    meta = read_patch_meta(path)
    want = meta["base_model"]["config_hash"]
    if config_hash(model) != want:
        raise PatchError(f"patch {path} was made for a different model (config hash differs; base model "
                         f"{meta['base_model'].get('name_or_path')!r})")
    tensors = _load_tensors(_patch_dir(path), meta)
    params = canonical_parameters(model)
    have, put = ("orig", "new") if forward else ("new", "orig")
    views = []
    # check every entry before writing any, so a mismatch leaves the model untouched
    for i, m in enumerate(meta["entries"]):
        e = PatchEntry(m["name"], m["dim"], m["start"], m["stop"])
        view = e.view(params)
        if list(view.shape) != m["shape"] or str(view.dtype).removeprefix("torch.") != m["dtype"]:
            raise PatchError(f"{m['name']}: model has shape {tuple(view.shape)} {view.dtype}, patch expects "
                             f"{tuple(m['shape'])} {m['dtype']}")
        if tensor_hash(view) != m[f"{have}_sha256"]:
            state = "original" if forward else "patched"
            raise PatchError(f"{m['name']}: the model does not hold the {state} values this patch expects; "
                             + ("apply earlier patches first (in order), or this patch is already applied"
                                if forward else "this patch is not applied, or later patches must be reverted "
                                "first (reverse order)"))
        if m.get("kind", "values") == "lowrank":  # computed from the factors, then checked bit for bit
            parts = entry_parts(meta, tensors, i)
            layout = entry_layout(m)
            value = (lowrank_value(view, layout, parts["a"], parts["b"]) if forward
                     else _lowrank_original(view, layout, parts))
            if tensor_hash(value) != m[f"{put}_sha256"]:
                raise PatchError(f"{m['name']}: the values computed from the low-rank factors do not match the "
                                 f"patch's sha256; nothing was {'applied' if forward else 'reverted'}")
            views.append((view, value, view.detach().cpu().clone()))
        else:
            views.append((view, tensors[f"{put}.{i}"], tensors[f"{have}.{i}"]))
    done = []
    try:
        with torch.no_grad():
            for view, value, before in views:
                view.copy_(value.to(view.device))
                done.append((view, before))
    except BaseException:
        with torch.no_grad():  # never half-patched: put back what was already written
            for view, before in done:
                view.copy_(before.to(view.device))
        raise
    return meta


def apply_patch(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Write the patch's new values into `model` in place; returns the patch metadata.
    Raises PatchError (model untouched) on a different model or when the model does not hold
    the values the patch was made from."""
    return _swap(model, path, forward=True)


def revert_patch(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Undo `apply_patch` (or an in-place `unlearn`) bit-exactly; PatchError if not applied."""
    return _swap(model, path, forward=False)
