"""What every command line of the project shares: one way to end on a user's mistake, logging, option types.

Each tool, tutorial, the demo and the apps end the same way:

    if __name__ == "__main__":
        sys.exit(run_tool(main))

`main(argv)` raises on a mistake the user can fix (a missing or unreadable input, an existing output, a full
disk, a file that does not fit: CLI_ERRORS); run_tool prints it as one line, `error: ...` (plus a `hint: ...`
line where there is advice), on stderr and returns 1. Usage errors exit 2, as argparse does. Anything else is a
bug and keeps its traceback.
"""

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ldm.checkpoint import UserError

CLI_ERRORS = (OSError, ValueError)  # UserError, CheckpointError and DiskFullError among them
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def configure_logging() -> None:
    """INFO and above on stderr, message only: library code reports through `logging`."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def error_lines(err: BaseException) -> list[str]:
    """`error: ...` in one line, and `hint: ...` when the error carries advice."""
    message = " ".join(line.strip() for line in str(err).strip().splitlines()) or type(err).__name__
    lines = [f"error: {message}"]
    if isinstance(err, UserError) and err.advice:
        lines.append(f"hint: {err.advice}")
    return lines


def run_tool(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a command line's `main(argv)`: 0 when it returns, 1 after one line for a CLI_ERRORS error."""
    configure_logging()
    try:
        main(argv)
    except CLI_ERRORS as err:
        print("\n".join(error_lines(err)), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def given_on_command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options whose values differ from the parser's defaults, as `--name value` (for the log)."""
    given = [f"--{name} {value}" for name, value in vars(args).items() if value != parser.get_default(name)]
    return ", ".join(given) or "defaults"


def refuse_existing(path: str | Path, force: bool) -> None:
    """Fail before any slow work when an output exists and --force was not given, or is a folder."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    if Path(path).exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")


def str2bool(value: str) -> bool:
    """An option's True/False (also 1/0, yes/no), as the original's variables are set."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def devices_arg(value: str) -> str | int | list[int]:
    """Lightning's `devices`: auto, a count, or a list like 0,1."""
    if value == "auto":
        return value
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v]
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a count or a list like 0,1, got {value!r}") from None
