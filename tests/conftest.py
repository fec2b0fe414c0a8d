"""Shared test set-up: the data directory, and no network, ever."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# One BLAS thread: small matrices gain nothing from two, a loaded machine loses a lot, and the summation
# order (hence the last bits of every float) stays the same from run to run. Must precede importing numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Tests must never touch the network; point the package at ../shared/data unless told otherwise.
os.environ["SCRATCHLM_OFFLINE"] = "1"
os.environ.setdefault("SCRATCHLM_DATA", str(SHARED_DATA))


def require_data(*relative: str) -> Path:
    """The data directory, or skip the test (fail under CI=true, where the data must be present)."""
    data = Path(os.environ["SCRATCHLM_DATA"])
    missing = [r for r in relative if not (data / r).is_file()]
    if missing:
        message = f"data not found: {', '.join(missing)} under {data}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have ../shared/data)")
        pytest.skip(message)
    return data


def assert_documented(*commands: str, description: bool = True) -> None:
    """Every named ``python -m scratchlm`` command, each of its subcommands and each of
    their options has help text (and, with ``description``, the command a description):
    ``--help`` is how a reader finds out what a flag does."""
    import argparse

    from scratchlm.cli import build_parser

    def check(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                assert all(helps.get(sub_name) for sub_name in action.choices), name
                for sub_name, command in action.choices.items():
                    check(command, f"{name} {sub_name}")
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings}"

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in commands:
        assert next(choice.help for choice in top._choices_actions if choice.dest == name), name
        if description:
            assert top.choices[name].description, name
        check(top.choices[name], name)


class FakeClock:
    """Stands in for the ``time`` module: time passes only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
