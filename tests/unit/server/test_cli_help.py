"""Every flag of every `fewstep` command says what it does, and argparse's errors name things in users' words."""

from __future__ import annotations

import argparse

import pytest

from fewstep.server.cli import build_parser


def undocumented(parser: argparse.ArgumentParser, path: str = "fewstep") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.add_help:  # passthrough tools (bench pipeline, train) document themselves: tested below
                    missing += undocumented(sub, f"{path} {name}")
        elif isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        elif not action.help:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_has_help_text():
    assert undocumented(build_parser()) == []


def test_the_check_can_fail():
    p = argparse.ArgumentParser()
    p.add_argument("--documented", help="yes")
    p.add_argument("--bare")
    assert undocumented(p) == ["fewstep --bare"]


@pytest.mark.parametrize("argv, words", [([], "COMMAND"), (["bench"], "BENCHMARK")])
def test_missing_command_errors_name_no_internal_dest(argv, words, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert words in err and "cmd" not in err.replace("COMMAND", "")


def test_passthrough_tools_document_their_flags():
    """`fewstep bench pipeline|...` and `fewstep train STAGE` build their own parsers: every flag has help there too."""
    import importlib

    from fewstep.server.cli import BENCH_TOOLS

    for name, (module, _) in BENCH_TOOLS.items():
        mod = importlib.import_module(module)
        build = getattr(mod, "build_parser", None)
        if build is None:
            continue
        missing = undocumented(build(), f"fewstep bench {name}")
        assert not missing, missing
