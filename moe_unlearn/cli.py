"""The `moe-unlearn` command line. Each subcommand lives in moe_unlearn/commands/<name>.py
and exposes `add_parser(subparsers)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

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


def _prog(args: argparse.Namespace | None) -> str:
    return f"moe-unlearn {args.command}" if args is not None else "moe-unlearn"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 done, 2 a bad input or a refused write (one line on stderr, no
    traceback, nothing written), 130 interrupted (Ctrl-C: outputs are atomic, so nothing half-written stays),
    141 the reader of stdout went away (`| head`: quiet, like any Unix tool)."""
    args = None
    try:
        args = build_parser().parse_args(argv)  # inside: a Ctrl-C while the heavy imports run is an interrupt too
        from moe_unlearn.log import setup_cli_logging

        setup_cli_logging(args.verbose, args.log_quiet)
        return int(args._run(args) or 0)
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
