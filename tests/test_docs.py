"""The README names every flag the scripts accept, so the documentation cannot fall behind
the code."""
import argparse
import os
import re

import pytest

import sample_vae
import train_vae
from conftest import ROOT


def flags(script):
    """Every long option of a script's parser, found by capturing the parser it builds."""
    captured = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured.append(self)
        return original(self, [] if args is None else args, namespace)
    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return {option for action in captured[0]._actions for option in action.option_strings
            if option.startswith("--") and option not in ("--help", "--one")}


@pytest.mark.parametrize("script", [train_vae, sample_vae])
def test_readme_documents_every_flag(script):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        documented = set(re.findall(r"--[a-z][a-z-]*", file.read()))
    missing = {flag for flag in flags(script) if flag not in documented and not flag.startswith("--no-")}
    assert not missing, f"{script.__name__}.py flags the README never names: {sorted(missing)}"
