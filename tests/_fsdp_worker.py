"""One rank of the FSDP2 sharded-unlearning test (tests/test_sharding.py runs it under torchrun; the
reference is one process without sharding and grad_accum = world * grad_accum)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.distributed import init_from_env, world
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainHooks
from moe_unlearn.unlearning import unlearn

FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(6 + i % 3)) for i in range(8)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(7)) for i in range(8)]
TARGET = "1:2"
TRAINED = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
           "model.layers.1.mlp.gate.weight"]  # the parameters holding target 1:2's slices and its router


def run(out: str, grad_accum: int, mode: str = "single") -> dict:
    """mode: single (one process, no sharding), fsdp2 (shard="fsdp2"), fsdp2_nocache (prefix cache off),
    user (the model wrapped with fully_shard by the caller, the target layer's trained tensors whole),
    loaded (read sharded from the saved model by `load_sharded`, which reports the bytes each rank read)."""
    loaded: dict = {}
    if mode == "loaded":
        from moe_unlearn.sharding import load_sharded

        model = load_sharded(Path(out).parent / "model", TRAINED, report=loaded)
    else:
        model = tiny_model("qwen3_moe")
    opts = dict(method="graddiff", scope="uoe", target=TARGET, steps=2, lr=1e-2, batch_size=2, grad_accum=grad_accum,
                max_length=12, progress=False, out_dir=out, prefix_cache=mode != "fsdp2_nocache")
    if mode.startswith("fsdp2") or mode == "loaded":
        opts["shard"] = "fsdp2"
    elif mode == "user":
        from torch.distributed.fsdp import fully_shard

        mlp = model.model.layers[1].mlp
        keep = {mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight}
        for layer in model.model.layers:
            fully_shard(layer, ignored_params=keep & set(layer.parameters()) or None)
        fully_shard(model, ignored_params=keep)
    peak = PeakLocalBytes(model)
    unlearn(model, FORGET, RETAIN, tokenizer=word_tokenizer(), callbacks=[peak], **opts)
    return {**memory_report(model), "peak": peak.peak, **loaded}


class PeakLocalBytes(TrainHooks):
    """The most parameter bytes this rank stored after any backward or step of the run."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.peak = model, 0

    def _count(self) -> None:
        from moe_unlearn.sharding import local_param_bytes

        self.peak = max(self.peak, local_param_bytes(self.model))

    def after_backward(self, step: int) -> None:
        self._count()

    def after_step(self, step: int) -> None:
        self._count()


def attribution(out: str, mode: str = "single") -> None:
    """Attribution of FORGET (3 batches: one rank of two runs an idle pass), split over the ranks and not,
    on a model sharded by `shard_model` (attr_fsdp2) or one process (single); saved to OUT."""
    from moe_unlearn.attribution import attribute_experts
    from moe_unlearn.sharding import shard_model

    model = tiny_model("qwen3_moe")
    if mode != "single":
        shard_model(model, [])
    state = {}
    for split in (False, True):
        att = attribute_experts(model, FORGET, tokenizer=word_tokenizer(), batch_size=3, max_length=12,
                                keep_token_routing=not split, progress=False, stability=True)
        for k in ("affinity", "frequency", "mean_score", "counts"):
            state[f"{split}.{k}"] = getattr(att, k)
        state[f"{split}.tokens"] = torch.tensor([att.num_tokens, att.num_sequences])
        state[f"{split}.top"] = torch.tensor([[att.top(1)[0].layer, att.top(1)[0].expert]])
    torch.save(state, out)


def evaluation(out: str, mode: str = "single") -> None:
    """evaluate() (likelihoods, generation, MIA, routing) of a model sharded by `shard_model` (eval_fsdp2)
    or of one process (single), its report saved as JSON to OUT; the sharded model's first forward is
    evaluate()'s own."""
    import json

    from moe_unlearn.eval import evaluate
    from moe_unlearn.sharding import shard_model

    model = tiny_model("qwen3_moe")
    if mode != "single":
        shard_model(model, [])
    qa = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2} w{i + 3}"} for i in range(0, 30, 6)]
    rep = evaluate(model, word_tokenizer(), forget=qa[:3], retain=qa[3:] + RETAIN[:2], holdout=RETAIN[2:6],
                   batch_size=2, max_new_tokens=4, verbmem_max_new_tokens=4, progress=False)
    Path(out).write_text(json.dumps(rep.to_dict(), default=str))


def save_inputs(root: str) -> None:
    """The saved model, tokenizer and data files the CLI modes read (written once, before the ranks start)."""
    import json

    root = Path(root)
    tiny_model("qwen3_moe").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "forget.txt").write_text("\n".join(FORGET) + "\n")
    (root / "retain.txt").write_text("\n".join(RETAIN) + "\n")
    qa = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2} w{i + 3}"} for i in range(0, 36, 6)]
    for name, rows in (("qa_forget", qa[:3]), ("qa_retain", qa[3:]), ("holdout", [{"text": t} for t in RETAIN[:4]])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def cli(root: str, command: str, out: str, shard: bool) -> None:
    """`moe-unlearn attribute` / `evaluate` (with the one-process patch of `run`, in ROOT/single) on the
    saved model, sharded with --shard fsdp2 or not; results in OUT."""
    from moe_unlearn.cli import main as cli_main

    root = Path(root)
    flags = ["--shard", "fsdp2"] if shard else []
    if command == "unlearn":  # the options of `run`
        argv = ["unlearn", "--model", str(root / "model"), "--forget", str(root / "forget.txt"), "--retain",
                str(root / "retain.txt"), "--method", "graddiff", "--scope", "uoe", "--target", TARGET, "--steps", "2",
                "--lr", "1e-2", "--batch-size", "2", "--max-length", "12", "--quiet", "--out", out]
    elif command == "attribute":
        argv = ["attribute", "--model", str(root / "model"), "--data", str(root / "forget.txt"), "--batch-size", "3",
                "--max-length", "12", "--stability", "--out", out]
    else:
        argv = ["evaluate", "--model", str(root / "model"), "--patch", str(root / "single"), "--forget",
                str(root / "qa_forget.jsonl"), "--retain", str(root / "qa_retain.jsonl"), "--holdout",
                str(root / "holdout.jsonl"), "--batch-size", "2", "--max-new-tokens", "4", "--quiet", "--out", out]
    assert cli_main([*argv, *flags]) == 0


def frontier(cache: str, out: str, shard: bool, grad_accum: int = 1) -> None:
    """A one-run frontier on the quick bench model (in the bench cache CACHE, built by the one-process run,
    which takes grad_accum = ranks where the ranks take 1 each), sharded with shard="fsdp2" or not; results
    in OUT."""
    from moe_unlearn.frontier import FrontierConfig, run_frontier

    cfg = FrontierConfig(quick=True, methods=("ga",), variants=("uoe",), lrs={"uoe": (1e-2,)}, steps=(1, 2),
                         seeds=(0,), batch_size=4, grad_accum=grad_accum, shard="fsdp2" if shard else None)
    run_frontier(cfg, out_dir=out, cache_dir=cache, log=lambda _: None)


def memory_report(model: torch.nn.Module) -> dict:
    """Bytes this rank stores, its share of the sharded parameters (dim 0 split as FSDP2 splits it) and
    the bytes of the parameters it holds whole."""
    from moe_unlearn.sharding import is_dtensor, local_param_bytes

    rank, size = world()
    share = whole = 0
    whole_names = []
    for n, p in model.named_parameters():
        if is_dtensor(p):  # chunks of ceil(rows / size) rows, the last ranks' shorter or empty
            chunk = math.ceil(p.shape[0] / size)
            rows = max(0, min(chunk, p.shape[0] - rank * chunk))
            share += rows * (p[0].numel() if p.dim() > 1 else 1) * p.element_size()
        else:
            whole += p.numel() * p.element_size()
            whole_names.append(n)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"local": local_param_bytes(model), "share": share, "whole": whole, "total": total,
            "whole_names": whole_names}


def main(out_root: str, grad_accum: int, modes: list[str], bench_cache: str | None = None) -> None:
    """Each mode in turn (one process group, a fresh model each): OUT_ROOT/MODE/ and its memory reports."""
    init_from_env("cpu")
    rank, _ = world()
    for mode in modes:
        out = Path(out_root) / mode
        if mode.startswith("cli_"):  # cli_unlearn, cli_attribute, cli_evaluate: the command with --shard fsdp2
            cli(out_root, mode[4:], str(out), shard=True)
            continue
        if mode == "frontier":
            frontier(bench_cache, str(out), shard=True)
            continue
        if mode.startswith(("attr", "eval")):
            if mode.startswith("attr"):
                attribution(str(out.with_name(f"{mode}.rank{rank}.pt")), mode)
            else:
                evaluation(str(out.with_name(f"{mode}.rank{rank}.json")), mode)
            continue
        rep = run(str(out), grad_accum, mode)
        torch.save(rep, out.with_name(f"{mode}.rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), *sys.argv[4:])
