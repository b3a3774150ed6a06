"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

import os
import sys


class UserError(Exception):
    """A failure with a cause the user can fix; its message is the whole report."""


class SharedError(UserError):
    """Raised alike by every rank of a run (decided on one, shared with all): the main
    process reports it, the others exit with its code in silence."""


class ConfigError(UserError):
    """A bad setting: every process derives it alike from the same command line and (on its node)
    the same files, so each node's first process reports it."""


class DataError(UserError):
    pass


class Terminated(BaseException):
    """SIGTERM made an exception where a command has to clean up on its way out (as Python makes
    SIGINT a KeyboardInterrupt): the finally blocks run, then the CLI prints the message as its
    one line and exits 128 + 15, as a process ended by the signal would."""

    def __init__(self, message: str = "terminated (SIGTERM)"):
        super().__init__(message)


def reported_here(e: UserError) -> bool:
    """Whether this process prints the user error `e`: one line per run, not one per rank, where
    every rank raises it alike (a SharedError: by rank 0; a ConfigError: by each node's first
    process, so a node that differs is still heard); any other error by the process that hit it."""
    if isinstance(e, SharedError):
        return os.environ.get("RANK", "0") == "0"
    if isinstance(e, ConfigError):
        return os.environ.get("LOCAL_RANK", "0") == "0"
    return True


# How long a rank that stays silent on a SharedError waits before it exits: rank 0 prints the line
# and finishes its cleanup (W&B) meanwhile, then exits first, and the launcher (torch elastic, or srun
# --kill-on-bad-exit) ends the waiting ranks and names rank 0 as the one that failed first. Were a
# silent rank to exit first, its exit would end rank 0 before (or while) it says why.
SILENT_RANK_WAIT_S = 10.0


def report(e: UserError) -> None:
    """The CLI's one line for `e`, where this process reports it (`reported_here`), printed once:
    rank 0 calls it as soon as the error reaches its cleanup, before W&B's finish, so the cause
    is on stderr whatever ends the process next; the CLI's own call then finds it done."""
    if getattr(e, "reported", False):
        return
    e.reported = True
    if reported_here(e):
        print(f"vae-dist: error: {e}", file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type where it has none), for a one-line report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 shard`, `3 shards`: a count with its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
