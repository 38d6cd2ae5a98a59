"""Every name the package advertises resolves, and the function/subpackage names do not collide."""

import importlib

import moe_unlearn


def test_every_export_resolves():
    missing = []
    for name in moe_unlearn.__all__:
        if not hasattr(moe_unlearn, name):
            missing.append(name)
    assert not missing, f"advertised but not importable: {missing}"


def test_unlearn_stays_the_function_after_the_subpackage_is_imported():
    importlib.import_module("moe_unlearn.unlearning")
    from moe_unlearn import unlearn

    assert callable(unlearn) and unlearn.__module__ == "moe_unlearn.unlearning.engine"


def test_every_cli_command_is_registered():
    from moe_unlearn.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
