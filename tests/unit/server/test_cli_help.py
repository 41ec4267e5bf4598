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
    """`fewstep bench pipeline|...`, `fewstep train study|bench` and `fewstep train STAGE` build their own parsers:
    every flag has help there too. A listed tool without a side-effect-free `build_parser()` fails the test rather
    than being skipped."""
    import importlib

    from fewstep.server.cli import BENCH_TOOLS, TRAIN_TOOLS

    tools = {f"fewstep bench {name}": module for name, (module, _) in BENCH_TOOLS.items()}
    tools |= {f"fewstep train {name}": module for name, (module, _) in TRAIN_TOOLS.items()}
    tools["fewstep train"] = "fewstep.training.__main__"
    assert len(tools) == len(BENCH_TOOLS) + len(TRAIN_TOOLS) + 1
    no_parser, missing = [], []
    for prog, module in tools.items():
        build = getattr(importlib.import_module(module), "build_parser", None)
        if build is None:
            no_parser.append(f"{prog} ({module})")
            continue
        parser = build()
        assert isinstance(parser, argparse.ArgumentParser), prog
        missing += undocumented(parser, prog)
    assert no_parser == [], f"tools without build_parser(): {no_parser}"
    assert missing == [], missing


def _subparser_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield action
            for sub in action.choices.values():
                yield from _subparser_actions(sub)


@pytest.mark.parametrize("module", ["fewstep.benchmarks.quality", "fewstep.training.__main__",
                                    "fewstep.training.study"])
def test_tool_subcommands_have_a_metavar(module, capsys):
    """A tool's missing-subcommand error names a placeholder (STAGE, STUDY, COMMAND), never argparse's dest."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    actions = list(_subparser_actions(parser))
    assert actions and all(a.metavar for a in actions)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    err = capsys.readouterr().err
    assert "cmd" not in err and actions[0].metavar in err
