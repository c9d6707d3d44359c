"""Every command's --help shows every option's default (README promises it)."""
import argparse
import importlib

import pytest

COMMANDS = ["pretrain", "finetune", "convert", "shards", "analyze", "visualize", "knn"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_a_default_shows_it_in_help(command):
    parser = importlib.import_module(f"fcmae.cli.{command}").build_parser()
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            continue
        if "(default:" not in formatter._format_action(action):
            missing.append(action.option_strings[0])
    assert not missing, f"fcmae-{command} --help shows no default for {missing}"
