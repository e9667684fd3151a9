"""What every command-line entry point shares: a user's mistake ends in one line on stderr and a non-zero exit
code, never a traceback; ``--debug`` (or ``SKELEMIX_DEBUG=1``) shows the traceback instead, for bug reports.

User mistakes are ``ValueError`` (the package's :class:`~skelemix.config.ConfigError`,
:class:`~skelemix.checkpoint.CheckpointError` and :class:`~skelemix.data.errors.DataFormatError` derive from it),
refused or damaged pickles, the trainer's stop on a non-finite loss (``FloatingPointError``) and ``OSError``
(missing files, read-only folders, a full disk). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import reprlib
import signal
import sys
import threading
import time
from typing import Callable

DEBUG_ENV = "SKELEMIX_DEBUG"
USER_ERRORS = (ValueError, OSError, FloatingPointError, pickle.UnpicklingError)
MAX_MESSAGE = 2000  # characters of one error line

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 8
_short.maxlevel = 3


def short(value) -> str:
    """``repr(value)`` cut to a bounded size (in time too: huge or self-referencing values are not walked),
    for showing what a user passed inside an error message."""
    return _short.repr(value)


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser``, or on each of its sub-commands when it has them (where users type options)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for p in {id(p): p for a in actions for p in a.choices.values()}.values() if actions else [parser]:
        p.add_argument("--debug", action="store_true",
                       help=f"show the full traceback of an error (for bug reports; or set {DEBUG_ENV}=1)")


def debugging(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(err: BaseException) -> str:
    """The one line that tells a user what went wrong."""
    if isinstance(err, OSError) and err.strerror:  # raised by the OS: name the file, not the errno
        where = "".join(f"{name}: " for name in (err.filename, err.filename2) if name is not None)
        text = f"{where}{err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return clip(" ".join(text.split("\n")))


def handle(err: BaseException, debug: bool = False, exit_code: int = 2, interrupted: str = "interrupted",
           hint: str = "") -> int:
    """Print ``err`` as one ``error: ...`` line and return ``exit_code`` (130 and ``interrupted`` for Ctrl-C).

    Re-raises ``err`` when it is not a user's mistake, or when debugging (``debug`` or ``SKELEMIX_DEBUG``).
    ``hint`` is appended to the line. Call it from an ``except BaseException`` block.
    """
    if debugging(debug) or not isinstance(err, (KeyboardInterrupt, *USER_ERRORS)):
        raise err
    if isinstance(err, KeyboardInterrupt):
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    from . import distributed

    prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    print(f"{prefix}error: {describe(err)}{hint}", file=sys.stderr)
    # No collective teardown: the other ranks may not have failed; torchrun ends them.
    return exit_code


def run(body: Callable[[], object], debug: bool = False, exit_code: int = 2) -> int:
    """``body()`` as a command: its exit status when it returns an int, else 0; its user errors turned into one
    line and ``exit_code`` by :func:`handle`."""
    try:
        status = body()
        return status if isinstance(status, int) else 0
    except BaseException as err:  # noqa: BLE001 - handle() re-raises everything but user errors
        return handle(err, debug, exit_code)


@contextlib.contextmanager
def ctrl_c_flag():
    """An event that Ctrl-C sets, for a loop that finishes its step and stops cleanly; a second Ctrl-C aborts at
    once (the handler before it is back). Outside the main thread no handler can be set: the event stays clear."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


class StepProgress:
    """A progress bar (tqdm) of training steps with the loss and the samples per second since it started; nothing
    is shown unless ``enabled``."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                        disable=not enabled)
        self.start, self.steps = time.perf_counter(), 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def step(self, loss: float, batch_size: int):
        self.steps += 1
        rate = self.steps * batch_size / (time.perf_counter() - self.start)
        self.bar.set_postfix(loss=f"{loss:.3f}", samples_per_s=f"{rate:.0f}")
        self.bar.update(1)
