"""`EvalReport`: everything `evaluate` measured, as JSON, a markdown table and a routing plot.
Every file is written to a temporary name beside the destination and renamed into place."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_unlearn.atomic import atomic_path, staged_files, write_text
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval.mcq import McqResult
from moe_unlearn.eval.metrics import SplitMetrics
from moe_unlearn.eval.mia import MIA_ATTACKS, MIAResult
from moe_unlearn.eval.routing import RoutingComparison


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@dataclass
class EvalReport:
    """splits: quality per split name; mia: forget-vs-holdout membership inference (needs both);
    mcq / mcq_letters: multiple-choice accuracy, cloze and lm-eval's letter protocol; lm_eval:
    lm-evaluation-harness results per task; routing: shift against the original model per split;
    examples: a few greedy generations per split; meta: settings and timings."""

    splits: dict[str, SplitMetrics]
    mia: MIAResult | None = None
    mcq: McqResult | None = None
    mcq_letters: McqResult | None = None
    lm_eval: dict[str, Any] | None = None
    routing: dict[str, RoutingComparison] = field(default_factory=dict)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        routing = {}
        for name, r in self.routing.items():
            d = dataclasses.asdict(r)
            d["target"] = list(r.target) if r.target is not None else None
            d["overlap_mean"], d["kl_mean"] = r.overlap_mean, r.kl_mean
            routing[name] = d
        return {
            "splits": {k: dataclasses.asdict(v) for k, v in self.splits.items()},
            "mia": dataclasses.asdict(self.mia) if self.mia else None,
            "mcq": dataclasses.asdict(self.mcq) if self.mcq else None,
            "mcq_letters": dataclasses.asdict(self.mcq_letters) if self.mcq_letters else None,
            "lm_eval": self.lm_eval,
            "routing": routing,
            "examples": self.examples,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        routing = {}
        for name, r in (d.get("routing") or {}).items():
            r = {k: v for k, v in r.items() if k not in ("overlap_mean", "kl_mean")}
            if r.get("target") is not None:
                r["target"] = tuple(r["target"])
            routing[name] = RoutingComparison(**r)
        return cls(
            splits={k: SplitMetrics(**v) for k, v in d["splits"].items()},
            mia=MIAResult(**d["mia"]) if d.get("mia") else None,
            mcq=McqResult(**d["mcq"]) if d.get("mcq") else None,
            mcq_letters=McqResult(**d["mcq_letters"]) if d.get("mcq_letters") else None,
            lm_eval=d.get("lm_eval"),
            routing=routing, examples=d.get("examples", {}), meta=d.get("meta", {}),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=True)
        return write_text(path, text + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvalReport:
        from moe_unlearn.errors import DataError
        from moe_unlearn.validate import read_json_file

        data = read_json_file(path, what="report", allow_nonfinite=True)  # NaN metrics are written as NaN
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DataError(f"report {path} is not a report.json written by evaluate: {type(exc).__name__}: "
                            f"{str(exc)[:120]}") from None

    def summary(self) -> dict[str, float]:
        """Flat {"forget.exact_match": ..., "mia.auc.loss": ..., "routing.retain.overlap": ...} of every
        number that is set (None skipped), for side-by-side tables of several reports."""
        flat: dict[str, float] = {}
        for name, s in self.splits.items():
            for key, value in dataclasses.asdict(s).items():
                if value is not None:
                    flat[f"{name}.{key}"] = value
        if self.mia:
            for group in ("auc", "privleak"):
                for attack, value in (getattr(self.mia, group) or {}).items():
                    flat[f"mia.{group}.{attack}"] = value
        if self.mcq:
            flat["mcq.accuracy"], flat["mcq.accuracy_norm"] = self.mcq.accuracy, self.mcq.accuracy_norm
        if self.mcq_letters:
            flat["mcq_letters.accuracy"] = self.mcq_letters.accuracy
        for task, metrics in (self.lm_eval or {}).items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"lm_eval.{task}.{key}"] = float(value)
        for name, r in self.routing.items():
            flat[f"routing.{name}.overlap"], flat[f"routing.{name}.kl"] = r.overlap_mean, r.kl_mean
            flat[f"routing.{name}.load_entropy"] = sum(r.load_entropy) / len(r.layers)
            if r.target_gate_mass is not None:
                flat[f"routing.{name}.target_gate_mass"] = r.target_gate_mass
                flat[f"routing.{name}.target_gate_mass_original"] = r.target_gate_mass_original
        return flat

    # -- markdown ----------------------------------------------------------
    def to_markdown(self) -> str:
        out = ["## Quality per split", "",
               "| split | items | NLL | token acc | exact match | ROUGE-L | VerbMem |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in self.splits.items():
            out.append(f"| {name} | {s.n_items} | {_fmt(s.nll)} | {_fmt(s.token_accuracy)} | {_fmt(s.exact_match)} | "
                       f"{_fmt(s.rouge_l, 1)} | {_fmt(s.verbmem, 1)} |")
        if self.mia:
            m = self.mia
            out += ["", f"## Membership inference (forget n={m.n_forget} vs holdout n={m.n_holdout}, {m.tokens} "
                    "tokens; AUC 0.5 = indistinguishable, 1 = forget texts recognised as members; MUSE's AUC "
                    "= 1 - AUC; PrivLeak as MUSE defines it: 0 = like the retrained model, -100 = like the "
                    "original)", "",
                    "| attack | AUC | AUC (MUSE) | PrivLeak % |", "|---|---:|---:|---:|"]
            for a in MIA_ATTACKS:
                leak = m.privleak.get(a) if m.privleak else None
                out.append(f"| {a} | {_fmt(m.auc[a])} | {_fmt(1 - m.auc[a])} | {_fmt(leak, 1)} |")
        for title, q in (("cloze", self.mcq), ("lm-eval letters A-D", self.mcq_letters)):
            if q:
                out += ["", f"## Multiple choice ({title}): accuracy {_fmt(q.accuracy)} (byte-normalised "
                        f"{_fmt(q.accuracy_norm)}, chance {_fmt(q.chance)}, n={q.n})"]
        if self.lm_eval:
            out += ["", "## lm-evaluation-harness", "", "| task | metric | value |", "|---|---|---:|"]
            for task, metrics in self.lm_eval.items():
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        out.append(f"| {task} | {key} | {_fmt(float(value))} |")
        if self.routing:
            out += ["", "## Routing vs the original model", "",
                    "| split | tokens | overlap | KL(orig‖new) | load entropy (orig → new) | target gate mass "
                    "(orig → new) |", "|---|---:|---:|---:|---:|---:|"]
            for name, r in self.routing.items():
                ent = f"{_fmt(sum(r.load_entropy_original) / len(r.layers))} → {_fmt(sum(r.load_entropy) / len(r.layers))}"
                tgt = "-" if r.target is None else (f"L{r.target[0]}/E{r.target[1]}: "
                                                    f"{_fmt(r.target_gate_mass_original)} → {_fmt(r.target_gate_mass)}")
                out.append(f"| {name} | {r.n_tokens} | {_fmt(r.overlap_mean)} | {_fmt(r.kl_mean, 4)} | {ent} | {tgt} |")
            names = list(self.routing)
            out += ["", "Overlap per layer:", "", "| layer | " + " | ".join(names) + " |",
                    "|---:|" + "---:|" * len(names)]
            first = self.routing[names[0]]
            for i, layer in enumerate(first.layers):
                out.append(f"| {layer} | " + " | ".join(_fmt(self.routing[n].overlap[i]) for n in names) + " |")
        return "\n".join(out) + "\n"

    def write_markdown(self, path: str | os.PathLike) -> Path:
        text = self.to_markdown()
        return write_text(path, text)

    # -- plot --------------------------------------------------------------
    def plot_routing(self, path: str | os.PathLike) -> Path:
        """PNG of expert-selection overlap per layer, one line per split (forget vs retain, ...)."""
        if not self.routing:
            raise BadInputError("this report has no routing metrics; evaluate with original= or original_routing=")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        try:
            for name, r in self.routing.items():
                ax.plot(r.layers, r.overlap, marker="o", label=f"{name} (mean {r.overlap_mean:.3f})")
            ax.set_xticks(sorted({layer for r in self.routing.values() for layer in r.layers}))
            ax.set_xlabel("MoE layer")
            ax.set_ylabel("expert-selection overlap")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title("Top-K routing kept vs the original model")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left")
            fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
            return Path(path)
        finally:
            plt.close(fig)

    def write_all(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """report.json, report.md and (with routing) routing_overlap.png in `out_dir`, all or nothing:
        everything is rendered into a temporary folder first, then moved in."""
        out = Path(out_dir)
        names = {"json": "report.json", "markdown": "report.md"}
        if self.routing:
            names["plot"] = "routing_overlap.png"
        # owned: a routing plot of an earlier run must not sit beside a report that has none
        with staged_files(out, owned=("report.json", "report.md", "routing_overlap.png")) as tmp:
            self.to_json(tmp / names["json"])
            self.write_markdown(tmp / names["markdown"])
            if "plot" in names:
                self.plot_routing(tmp / names["plot"])
        return {k: out / v for k, v in names.items()}
