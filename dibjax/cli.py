"""What the command-line tools share: errors as one line, exit statuses, quiet storage libraries.

``python -m dibjax.main`` and ``python -m dibjax.analysis`` run their ``main`` through :func:`run`, the
benchmarks theirs inside :func:`errors_as_lines`:

* a :class:`~dibjax.errors.RunError` (a mistake in the input or the environment) prints ``error: <message>`` on
  stderr and exits with status 1;
* :class:`~dibjax.errors.RunInterrupted` (SIGINT, SIGTERM) prints its message and exits with 128 + the signal's
  number, as a shell reports a process killed by it (130 for Ctrl-C, 143 for SIGTERM);
* any other exception is a bug in dibjax and keeps its traceback.

``--traceback`` prints the traceback in every case. Warnings print as ``warning: <message>``. orbax reports
failed background writes in absl's log before dibjax reports them itself, so absl's log shows only fatal
messages (and asyncio's log none) unless ``--traceback`` is given.
"""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator

from absl import app, flags, logging

from dibjax.errors import RunError, RunInterrupted

_TRACEBACK = flags.DEFINE_boolean("traceback", False, "Print the traceback of an error as well as its message.")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    del category, filename, lineno, line
    return f"warning: {message}\n"


@contextlib.contextmanager
def errors_as_lines(show_traceback: bool = False) -> Iterator[None]:
    """Ends the process as the command-line tools do: a :class:`~dibjax.errors.RunError` as ``error: <message>``
    and status 1, a :class:`~dibjax.errors.RunInterrupted` as its message and status 128 + the signal's number;
    the traceback as well only with ``show_traceback``. For scripts with their own argument parser, such as the
    benchmarks: ``with cli.errors_as_lines(): main()``."""
    try:
        yield
    except RunError as e:
        if show_traceback:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except RunInterrupted as e:
        if show_traceback:
            traceback.print_exc()
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signal_number)


def _guarded(main: Callable[[list[str]], None], argv: list[str]) -> None:
    if _TRACEBACK.value:
        logging.set_verbosity(logging.WARNING)
    else:
        logging.set_verbosity(logging.FATAL)
        # orbax's failed background writes also surface as asyncio's "exception was never retrieved".
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
        warnings.formatwarning = _format_warning
    with errors_as_lines(_TRACEBACK.value):
        main(argv)


def _unknown_override(argv: list[str]) -> str | None:
    """The first ``--config.a.b=value`` flag that names a field the loaded configuration lacks."""
    if "config" not in flags.FLAGS:
        return None
    config = flags.FLAGS["config"].value
    if config is None:  # absl may stop at an unknown flag before it parses --config
        path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
        try:
            config = flags.FLAGS["config"].parser.parse(path) if path else None
        except Exception:  # a config file that fails to load is reported by its own flag
            return None
    if config is None:
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node = config
        for name in arg.removeprefix("--config.").split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or name not in node.keys():
                return arg
            node = node[name]
    return None


def _no_such_field(flag: str) -> str:
    field = flag.removeprefix("--config.").split("=", 1)[0]
    return f"{flag}: the configuration has no field {field}; --helpfull lists the fields it has"


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags; a bad flag or configuration ends with one line, not absl's traceback."""
    try:
        args = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            flags.FLAGS["config"].value.keys()  # a config file that failed to load raises only when first read
        return args
    except OSError as e:  # ml_collections' deferred error for a config file it could not load
        message = f"--config: cannot load the config file ({str(e).strip().splitlines()[-1].strip()})"
    except flags.Error as e:
        # A configuration file's error reaches absl wrapped, its message replaced by a traceback: report the original.
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, RunError):
            cause = cause.__cause__ or cause.__context__
        while cause is not None and isinstance(cause.__context__, RunError):
            cause = cause.__context__
        # absl's own message can name another --config.* flag than the unknown one.
        bad = _unknown_override(argv) if cause is None else None
        message = _no_such_field(bad) if bad else str(cause) if cause is not None else str(e)
    except (AttributeError, KeyError):  # ml_collections' answer to an override of a field that does not exist
        bad = _unknown_override(argv)
        if bad is None:
            raise
        message = _no_such_field(bad)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)``, with dibjax's handling of errors and interruptions."""
    app.run(functools.partial(_guarded, main), flags_parser=_parse_flags)
