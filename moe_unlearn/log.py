"""Logging: the package's `logging` loggers and the optional metrics sinks of the training loop.

Loggers: `get_logger(__name__)` gives "moe_unlearn.<module>"; the library adds no handler (the
application decides), except the CLI, which calls `setup_cli_logging`: warnings and errors by
default, `--verbose` info (what was loaded from where, a summary per run), `-vv` debug (every
optimizer step's loss terms), `--quiet` errors only. Results a command prints (tables, "wrote
...") stay on stdout; log records go to stderr.

Metrics sinks (`open_sinks`, used by `moe_unlearn.training.train` when `report_to` is set): each
logged step's loss terms, lr and gradient norm go to
- "tensorboard": event files under `logging_dir` (torch.utils.tensorboard; needs the tensorboard
  package, refused with an install hint otherwise);
- "jsonl": one JSON object per logged step in `logging_dir/metrics.jsonl` (no dependency).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moe_unlearn.errors import BadInputError

ROOT = "moe_unlearn"
SINKS = ("tensorboard", "jsonl")
logging.getLogger(ROOT).addHandler(logging.NullHandler())  # a library: silent unless the application asks


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger of a module of this package (`get_logger(__name__)`)."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def level_for(verbose: int = 0, quiet: bool = False) -> int:
    """The level of the CLI's flags: quiet -> ERROR, none -> WARNING, -v -> INFO, -vv -> DEBUG."""
    if quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (not the one at creation), so a replaced stderr works."""

    @property
    def stream(self):  # type: ignore[override]
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_cli_logging(verbose: int = 0, quiet: bool = False) -> None:
    """One stderr handler on the package logger, at the level of the CLI's flags (idempotent)."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level_for(verbose, quiet))
    for h in list(logger.handlers):
        if getattr(h, "_moe_unlearn_cli", False):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("moe-unlearn: %(levelname)s: %(message)s"))
    handler._moe_unlearn_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    warnings.showwarning = _show_warning  # one line per warning (no source line), hidden by --quiet


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger(ROOT).warning("%s: %s", category.__name__, message)


class MetricsSink:
    """Where a training run's logged metrics go; `log` once per logged step, `close` at the end."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlSink(MetricsSink):
    """metrics.jsonl: {"step": N, name: value, ...} per logged step, flushed each time."""

    def __init__(self, logging_dir: str | os.PathLike) -> None:
        Path(logging_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(logging_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._fh.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink(MetricsSink):
    """TensorBoard scalars (torch.utils.tensorboard.SummaryWriter), one tag per metric under train/."""

    def __init__(self, logging_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BadInputError("report_to tensorboard needs the tensorboard package (pip install tensorboard); "
                                "or use report_to jsonl") from None
        self.writer = SummaryWriter(log_dir=str(logging_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", float(v), int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """`report_to` as a list of sink names ("none" or None: no sink; "tensorboard,jsonl": both)."""
    if value is None:
        return []
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    names = [n for n in names if n != "none"]
    bad = [n for n in names if n not in SINKS]
    if bad:
        raise BadInputError(f"unknown report_to {bad}; use {', '.join(SINKS)} or none")
    return names


def open_sinks(report_to: str | Sequence[str] | None, logging_dir: str | os.PathLike | None) -> list[MetricsSink]:
    """The sinks `report_to` names, writing under `logging_dir` (required when any is named)."""
    names = parse_report_to(report_to)
    if names and not logging_dir:
        raise BadInputError("report_to needs logging_dir (CLI: --logging-dir DIR)")
    kinds: dict[str, Any] = {"tensorboard": TensorBoardSink, "jsonl": JsonlSink}
    return [kinds[n](logging_dir) for n in names]


__all__ = ["JsonlSink", "MetricsSink", "SINKS", "TensorBoardSink", "get_logger", "level_for", "open_sinks",
           "parse_report_to", "setup_cli_logging"]
