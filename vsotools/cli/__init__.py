"""The ``vsotools`` command line: a thin layer of argument parsing and output over the library."""

from vsotools.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
