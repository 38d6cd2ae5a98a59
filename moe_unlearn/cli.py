"""The `moe-unlearn` command line. Each subcommand lives in moe_unlearn/commands/<name>.py
and exposes `add_parser(subparsers)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Any

from moe_unlearn.errors import MoEUnlearnError

# name -> module. Command modules import their heavy dependencies inside run(), so building the
# parser stays cheap.
COMMANDS: dict[str, str] = {
    "inspect": "moe_unlearn.commands.inspect",
    "attribute": "moe_unlearn.commands.attribute",
    "locate": "moe_unlearn.commands.locate",
    "unlearn": "moe_unlearn.commands.unlearn",
    "evaluate": "moe_unlearn.commands.evaluate",
    "evaluate-sequential": "moe_unlearn.commands.evaluate_sequential",
    "fuse": "moe_unlearn.commands.fuse",
    "demo": "moe_unlearn.commands.demo",
    "frontier": "moe_unlearn.commands.frontier",
    "loramoe": "moe_unlearn.commands.loramoe",
}


def build_parser() -> argparse.ArgumentParser:
    from moe_unlearn import __version__

    parser = argparse.ArgumentParser(prog="moe-unlearn", description="Unlearning for Mixture-of-Experts LLMs")
    parser.add_argument("--version", action="version", version=f"moe-unlearn {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what is loaded and each run's summary to stderr (-vv: every training step)")
    parser.add_argument("-q", "--quiet", dest="log_quiet", action="store_true", help="log errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        mod = importlib.import_module(module)
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe stays silent."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (a captured one): nothing to redirect
        pass


class _Interrupts:
    """SIGINT for the CLI: KeyboardInterrupt as usual, except while a module is being imported. Raised inside
    third-party import code, the interrupt is not always an interrupt: transformers' lazy loader turns it
    into an "import failed" error (exit 2 with a wrong message), a pybind11 module initialising aborts the
    process, and code run through PyRun_* marks it unhandled so the interpreter kills itself with SIGINT
    after `main` returned 130. So an interrupt that lands inside an import is deferred: it is re-delivered
    every few milliseconds until the import finished, then raised as a KeyboardInterrupt in our own code
    (nothing is written during imports, so deferring loses nothing)."""

    RETRY_S = 0.02
    MAX_DEFER_S = 10.0  # longer than any import should take; then the interrupt is raised where it is

    def __init__(self) -> None:
        self.pending = False
        self._since = 0.0
        self._timer: Any = None
        self._previous: Any = None

    @staticmethod
    def _importing(frame: Any) -> bool:
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
                return True
            frame = frame.f_back
        return False

    def _handle(self, signum: int, frame: Any) -> None:
        import time

        if not self.pending:
            self._since = time.monotonic()
        # an import that never ends (stuck on a lock or a network mount) must stay interruptible
        if self._importing(frame) and time.monotonic() - self._since < self.MAX_DEFER_S:
            self.pending = True
            self._retry()
            return
        self.pending = False
        raise KeyboardInterrupt

    def _retry(self) -> None:
        import _thread
        import threading

        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.RETRY_S, _thread.interrupt_main, args=(signal.SIGINT,))
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self) -> _Interrupts:
        import threading

        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _prog(args: argparse.Namespace | None) -> str:
    return f"moe-unlearn {args.command}" if args is not None else "moe-unlearn"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 done, 2 a bad input or a refused write (one line on stderr, no
    traceback, nothing written), 130 interrupted (Ctrl-C: outputs are atomic, so nothing half-written stays),
    141 the reader of stdout went away (`| head`: quiet, like any Unix tool)."""
    args = None
    try:
        with _Interrupts() as interrupts:
            args = build_parser().parse_args(argv)  # inside: a Ctrl-C while the heavy imports run is one too
            from moe_unlearn.log import setup_cli_logging

            setup_cli_logging(args.verbose, args.log_quiet)
            code = int(args._run(args) or 0)
            if interrupts.pending:  # deferred during a last import and not yet re-delivered
                raise KeyboardInterrupt
            return code
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted; no half-written output was left", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except MoEUnlearnError as exc:
        print(f"{_prog(args)}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no (disk full mid-save, permissions): outputs are atomic
        from moe_unlearn.atomic import is_out_of_space

        hint = "free some space or choose another --out" if is_out_of_space(exc) else "check the path"
        print(f"{_prog(args)}: error: cannot read or write {exc.filename or 'a file'}: "
              f"{exc.strerror or exc}; nothing was written; {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
