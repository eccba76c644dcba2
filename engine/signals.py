"""SIGINT and SIGTERM (Ctrl-C, a cluster scheduler's preemption notice) end a run cleanly.

During training the first signal only sets a flag: the run stops at the next step boundary, writes a checkpoint
and exits with ``EXIT_INTERRUPTED`` (75, ``EX_TEMPFAIL`` of sysexits: run the same command with ``--resume`` to
continue). A second signal exits at once with 128 + its number (130 for SIGINT, 143 for SIGTERM): the exception
it raises unwinds every write in progress, which removes its temporary file and leaves the previous checkpoint
as it was. Outside training (start-up, evaluation) the first signal already exits at once: nothing is lost,
since evaluation starts only after the epoch's checkpoint is written.

Launchers forward signals: Ctrl-C under ``torchrun`` reaches each worker from the terminal and again from the
agent, a few milliseconds apart; signals within ``SAME_REQUEST_S`` of the first count as the same request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from engine.distributed import collective_device, get_world_size

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # stopped at a step boundary with a checkpoint: resumable
SAME_REQUEST_S = 0.5
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """The run stopped at a step boundary after a signal; the message says how to resume."""


class ForcedStop(BaseException):  # noqa: N818 - a BaseException, so that no ``except Exception`` swallows it
    """A signal asked to exit at once."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received: exited at once without writing a checkpoint")


class _State:
    """What the installed handler does: defer (training) or exit at once (everything else)."""

    def __init__(self) -> None:
        self.deferring = False
        self.requested: int | None = None  # the first signal's number
        self.first_at = 0.0
        self.pid = os.getpid()

    def handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return  # a forked data-loading worker: the training process decides, the workers end with it
        now = time.monotonic()
        if self.requested is not None and now - self.first_at < SAME_REQUEST_S:
            return  # the launcher forwarding the same Ctrl-C
        if not self.deferring or self.requested is not None:
            raise ForcedStop(signum)
        self.requested, self.first_at = signum, now
        logger.warning("%s received: stopping after this step with a checkpoint (send it again to exit at once)",
                       signal.Signals(signum).name)


_state = _State()


def _install() -> dict[int, Any] | None:
    """Install the handler; returns the previous handlers, None off the main thread (no handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _state.pid = os.getpid()
    return {sig: signal.signal(sig, _state.handle) for sig in _SIGNALS}


def _restore(previous: dict[int, Any] | None) -> None:
    if previous is not None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def handled() -> Iterator[None]:
    """Signals exit at once with one line (``ForcedStop``) instead of a traceback, for a whole entry point."""
    previous = _install()
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Within this block (training) a first signal only asks ``stop_requested`` to become true."""
    previous = _install()
    _state.deferring, _state.requested = True, None
    try:
        yield
    finally:
        _state.deferring = False
        _restore(previous)


@contextmanager
def immediate() -> Iterator[None]:
    """Within a ``deferred`` block: signals exit at once (evaluation, after the epoch's checkpoint)."""
    was, _state.deferring = _state.deferring, False
    try:
        yield
    finally:
        _state.deferring = was


def requested_signal() -> str | None:
    """The name of the signal that asked this process to stop, if any."""
    return None if _state.requested is None else signal.Signals(_state.requested).name


def stop_requested() -> bool:
    """Whether any rank received a stop signal; every rank must call it at the same step (one all-reduce)."""
    flag = _state.requested is not None
    if get_world_size() > 1:
        t = torch.tensor([float(flag)], device=collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Act as if ``signum`` had arrived (for tests and for code that wants the same clean stop)."""
    _state.handle(signum, None)
