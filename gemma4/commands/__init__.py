"""Implementations of the CLI subcommands (imported lazily by gemma4.cli)."""
