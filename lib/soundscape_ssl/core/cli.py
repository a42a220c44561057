"""How every command of the project fails: one line on stderr and an exit code, never a traceback.

`run_command` runs a command's `main(argv)` and turns any exception into

    <prog>: error: <one line>

on stderr, with exit code 2 for a problem with the command itself (a bad flag, a bad config: a
`UsageError` or `config.ConfigError`) and 1 for a failure while working (ValueError, OSError,
RuntimeError and the stages' own errors, which derive from them). `--verbose` (accepted by every
`CommandParser`, before or after a subcommand's name) adds debug logging and the traceback.
A problem with one input file is not an error: the stages record it as a skip and go on.

`soundscape-ssl` (pipeline/cli.py) and the `python -m` entry points of tiling, embedding,
validation and training all run through here, so they fail alike.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from .config import ConfigError

VERBOSE_FLAGS = ("-v", "--verbose")
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A problem with the command line itself (exit code 2)."""


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors are raised as UsageError (one line, no usage dump) and which accepts
    `-v/--verbose` itself, so the flag works after a subcommand's name too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser must not reset a --verbose given before its name.
        self.add_argument(*VERBOSE_FLAGS, action="store_true", default=argparse.SUPPRESS,
                          help="debug logging, and the traceback of an error")

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def wants_verbose(argv: Sequence[str]) -> bool:
    """Whether `--verbose` (or `-v`) is among the options (before any `--`)."""
    for token in argv:
        if token == "--":
            return False
        if token in VERBOSE_FLAGS:
            return True
    return False


def configure_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with --verbose) to stderr, unless the process configured logging already."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
                exit_codes: Mapping[type[BaseException], int] | None = None) -> int:
    """Run `main(argv)` and return its exit code; any exception becomes one line on stderr.

    `exit_codes` gives particular exception types their own codes (the first matching entry
    wins; training uses it for its documented codes); otherwise UsageError and ConfigError exit
    with 2, KeyboardInterrupt with 130 and everything else with 1. `--help` exits as argparse does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = wants_verbose(argv)
    configure_logging(verbose)
    try:
        return int(main(argv) or 0)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure of a command ends here, as one line
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {describe_error(error, verbose)}", file=sys.stderr, flush=True)
        return exit_code_for(error, exit_codes)


def exit_code_for(error: BaseException, exit_codes: Mapping[type[BaseException], int] | None = None) -> int:
    for kind, code in (exit_codes or {}).items():
        if isinstance(error, kind):
            return code
    return EXIT_USAGE if isinstance(error, (UsageError, ConfigError)) else EXIT_FAILURE


def describe_error(error: BaseException, verbose: bool = False) -> str:
    """The error as one line: its message (newlines folded), with its type where the message alone
    would not say what happened, and a pointer to --verbose for an error nobody anticipated."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = "; ".join(lines) or type(error).__name__
    ours = type(error).__module__.startswith("soundscape_ssl")
    if isinstance(error, (ValueError, OSError)) or ours:
        return message
    message = f"{type(error).__name__}: {message}"
    if not isinstance(error, (RuntimeError, LookupError)) and not verbose:
        message += " (unexpected: rerun with --verbose for the traceback)"
    return message
