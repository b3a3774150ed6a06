"""A lost or stalled rank, found within `train.collective_timeout_s` instead of torch's 30 minutes.

When one rank stops (SIGSTOP, a hung driver, a node gone), the others block in the next
collective (DDP's all-reduce, a sync point), where no Python runs and no exception comes until
the process group's own timeout, and an NCCL timeout aborts the process with a long dump.
So each rank runs a thread of its own beside the loop that, every few seconds:
- publishes a heartbeat in the process group's store (the TCP store every rank already talks
  to): a beat counter, its progress (steps, evaluation batches), its step, host and pid;
- once its own progress has stood still for a beat, reads every rank's heartbeat. A rank whose
  beat stands still is not answering (stopped, dead, its host gone); while no rank's progress
  moves for the timeout, the run is stalled.
  Then the lowest rank still answering prints one line naming the rank that is not (or, all
  answering, the one furthest behind), its host and its last step, and the newest checkpoint;
  every answering rank exits with code 2 (the launcher ends the rest). Checkpoints are written
  whole or not at all (checkpoint.py), so the newest one stays intact and resume=auto goes on.
The loop pays a Python integer increment per step; the store is touched by the thread only,
one write a second while the rank moves.
Timed from the first step of each start on: that step compiles (or captures) the step, the
same work on every rank, which can take minutes on a GPU. The process group's own timeout is
set a minute longer when the watchdog starts (RankWatchdog.start), a backstop for the first step.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

EXIT_CODE = 2
_KEY = "vae_dist/heartbeat/{}"


class RankWatchdog:
    """Collective in spirit: every rank of a run starts one (`start`) and stops it (`close`).
    `progress(step)` is the loop's whole part."""

    def __init__(self, rank: int, world: int, timeout_s: float, run_dir: Path, interval_s: float | None = None,
                 before_exit=lambda: None):
        self.rank, self.world, self.timeout_s, self.run_dir = rank, world, float(timeout_s), Path(run_dir)
        self.before_exit = before_exit  # rank 0 lets go of the run folder's lock: resume=auto may start at once
        self.interval_s = interval_s or min(1.0, max(0.2, self.timeout_s / 5))
        # a rank whose beat has not moved for this long is not answering (its thread would have beaten twice)
        self.silent_after_s = 2 * self.interval_s + 0.5
        self.step = self.moves = 0  # written by the loop, read by the thread (ints: no lock needed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host, self._pid = socket.gethostname(), os.getpid()

    # -- the loop's side -----------------------------------------------------------------
    def progress(self, step: int | None = None) -> None:
        """The rank moved on: a step taken (its number), an evaluation batch."""
        self.moves += 1
        if step is not None:
            self.step = step

    def start(self, step: int) -> None:
        if self.world == 1 or not self.timeout_s:  # nothing to wait for / switched off
            return
        import torch.distributed as dist

        self.step = step
        self._store = _own_store_client(timeout_s=2 * self.interval_s + 1)
        # the process group's own timeout from here on: a minute past ours, a backstop for what
        # the watchdog does not time (this start's first step). Setup keeps torch's default: a
        # long data.verify or checkpoint check on rank 0 is a legitimate wait there.
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=self.timeout_s + 60))
        self._beat = 0
        self._publish()  # known to the others from the start, whenever this rank stops
        self._thread = threading.Thread(target=self._watch, name="vae-dist-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the thread's side ---------------------------------------------------------------
    def _watch(self) -> None:
        """Beats every interval (one store write). While this rank moves the run is alive and
        nothing is read; once it has stood still for an interval, every rank's heartbeat is read
        each interval, until some rank moves again or the timeout passes."""
        seen: dict[int, dict] = {}  # rank -> its last heartbeat, with when (our clock) its beat last changed
        armed_at = self.moves  # the first step of this start is not timed (compile, capture)
        my_moves, moved_at = self.moves, time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - the store's host is gone: only our own progress tells
                pass
            if self.moves != my_moves or self.moves <= armed_at:
                my_moves, moved_at = self.moves, now
                seen.clear()
                continue
            if now - moved_at < self.interval_s:
                continue
            try:
                beats = self._read_all()
            except Exception:  # noqa: BLE001
                beats = {self.rank: self._heartbeat()}
            for rank, hb in beats.items():
                old = seen.get(rank)
                hb["beat_at"] = now if old is None or old["beat"] != hb["beat"] else old["beat_at"]
                if old is not None and old["moves"] != hb["moves"]:
                    moved_at = now  # another rank moves: the run is not stalled (a long val pass there)
                seen[rank] = hb
            if now - moved_at >= self.timeout_s and not self._stop.is_set():
                self._report_and_exit(seen, now, now - moved_at)

    def _heartbeat(self) -> dict:
        return {"beat": self._beat, "moves": self.moves, "step": self.step, "host": self._host, "pid": self._pid}

    def _publish(self) -> None:
        self._beat += 1
        self._store.set(_KEY.format(self.rank), json.dumps(self._heartbeat()))

    def _read_all(self) -> dict[int, dict]:
        found = {}
        for rank in range(self.world):
            key = _KEY.format(rank)
            if self._store.check([key]):
                found[rank] = json.loads(self._store.get(key))
        return found

    def _report_and_exit(self, seen: dict[int, dict], now: float, waited: float) -> None:
        silent = [r for r in range(self.world) if r not in seen or now - seen[r]["beat_at"] >= self.silent_after_s]
        answering = [r for r in range(self.world) if r not in silent]
        if self.rank == min(answering, default=self.rank):  # one line per run
            print(f"vae-dist: error: {self.describe(seen, silent, now, waited)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        try:
            self.before_exit()
        finally:
            os._exit(EXIT_CODE)  # the loop is blocked inside a collective: no exception reaches it

    def describe(self, seen: dict[int, dict], silent: list[int], now: float, waited: float) -> str:
        def who(r: int) -> str:
            hb = seen.get(r)
            if hb is None:
                return f"rank {r} (never answered)"
            return f"rank {r} (pid {hb['pid']} on {hb['host']}, last heard at step {hb['step']})"

        if silent:
            ago = max((now - seen[r]["beat_at"] for r in silent if r in seen), default=waited)
            what = (f"{', '.join(map(who, silent))} stopped answering {ago:.0f} s ago; the other ranks waited "
                    f"{waited:.0f} s for {'it' if len(silent) == 1 else 'them'}")
        else:  # all alive, none moving: a hang inside a collective; the rank furthest behind is the suspect
            low = min(seen[r]["step"] for r in seen)
            behind = [r for r in sorted(seen) if seen[r]["step"] == low]
            what = f"no rank made progress for {waited:.0f} s; furthest behind: {', '.join(map(who, behind))}"
        from vae_dist.checkpoint import newest_verified_checkpoint

        newest = newest_verified_checkpoint(self.run_dir)
        after = (f"the newest checkpoint {newest.name} is intact: train.resume=auto continues from it"
                 if newest is not None else "no checkpoint yet: a new start begins at step 0")
        return (f"{what} (train.collective_timeout_s={self.timeout_s:g}): the run stops; {after}")


def _own_store_client(timeout_s: float):
    """A client of the launch's TCP store of its own, with a short timeout: a store call never
    blocks the watchdog for long when the store's host is gone (the default store waits for
    the process group's timeout). The default store where the launch named no store address."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        try:
            return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                                 wait_for_workers=False)
        except (RuntimeError, ValueError):
            pass
    return dist.distributed_c10d._get_default_store()
