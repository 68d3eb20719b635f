"""The help formatters of the `gemma4` command lines: each option's default shown, none where
there is nothing to show."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default in (None, False, "") or action.default is argparse.SUPPRESS or action.help is None:
            return action.help
        if "%(default)" in action.help or "default" in action.help.lower():
            return action.help  # it says its default in its own words
        return super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """As `HelpFormatter`, with the description and epilog printed as written (examples, tables)."""
