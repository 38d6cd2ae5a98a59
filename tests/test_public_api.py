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


def test_expert_target_spellings_agree():
    from moe_unlearn.arch import ExpertTarget
    from moe_unlearn.attribution import TopEntry
    from moe_unlearn.errors import BadInputError

    want = ExpertTarget(2, 5)
    entry = TopEntry(layer=2, expert=5, score=0.3, near_tie=False, shared=False)
    for spelling in ("2:5", (2, 5), [2, 5], want, entry):
        assert ExpertTarget.coerce(spelling) == want
    assert ExpertTarget.coerce("1:shared").shared
    for bad in ("2-5", "a:b", (1, 2, 3), 7):
        try:
            ExpertTarget.coerce(bad)
        except BadInputError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
