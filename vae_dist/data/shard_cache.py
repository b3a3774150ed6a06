"""A bounded local cache of shards fetched from a URL, and the threads that fetch ahead of use.

`ShardCache` keeps shards of one remote set in a local folder under content-addressed names
(`<sha256[:16]>-<name>`): a shard replaced at the source has another digest in the new manifest,
hence another name, so a stale copy is never read. A file under its final name was verified
(size and sha256) on arrival; downloads land as `.partial` beside it and are renamed.

Processes share it safely (two ranks on one node, DataLoader workers): each shard has a lock
file (fcntl.flock). A fetch holds it exclusively, so the second process waits and then finds
the shard there; a consumer holds it shared while the shard is in use (`hold`), and eviction
deletes only shards whose lock it can take, least recently used first (a hit touches mtime).

`Prefetcher` runs the fetches on background threads in the consumer's order of use: the
consumer announces an epoch's shard sequence (`plan`), then `get`s each shard as it needs it;
the threads stay up to `depth` shards ahead, and what waits there is counted (`stats`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import threading
import time
from pathlib import Path

from vae_dist.data.remote import Remote, folder_url
from vae_dist.errors import DataError
from vae_dist.files import output_dir

_LOCKS = ".locks"
_STATS = ("fetches", "bytes", "seconds", "retries", "hits", "evicted")  # what ShardCache.stats counts
_CACHED = re.compile(r"^[0-9a-f]{16}-")  # a cached file's name: its sha256's first 16 hex digits, a dash, its name


def user_cache_dir() -> Path:
    """The per-user cache folder of vae-dist, as launch/gpu_check.sh finds it: $VAE_DIST_CACHE
    where set, else ${XDG_CACHE_HOME:-~/.cache}/vae-dist, else (no writable home)
    $TMPDIR/vae-dist-cache-UID, used only when it is this user's own private folder."""
    if os.environ.get("VAE_DIST_CACHE"):
        return Path(os.environ["VAE_DIST_CACHE"])
    home = os.environ.get("XDG_CACHE_HOME") or (os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else "")
    if home:
        cache = Path(home) / "vae-dist"
        try:
            cache.mkdir(parents=True, exist_ok=True)
            if os.access(cache, os.W_OK):
                return cache
        except OSError:
            pass
    fallback = Path(os.environ.get("TMPDIR", "/tmp")) / f"vae-dist-cache-{os.getuid()}"
    try:
        fallback.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise DataError(f"no cache folder: no writable home, and {fallback}: {e.strerror or e} "
                        "(set XDG_CACHE_HOME to a writable folder)") from None
    info = fallback.lstat()
    # a name anyone could have made first: only this user's own private folder will do
    if fallback.is_symlink() or not fallback.is_dir() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise DataError(f"{fallback} is not a private folder of this user (a link, another owner, or not mode 700): "
                        "set XDG_CACHE_HOME to a writable folder")
    return fallback


def default_folder(url: str) -> Path:
    """Where the shards of `url` are cached by default: a folder of their own per URL under
    the user's cache (`.../vae-dist/shards/<sha256(url)[:16]>/`)."""
    digest = hashlib.sha256(folder_url(url).encode()).hexdigest()[:16]
    return user_cache_dir() / "shards" / digest


def _flat(name: str) -> str:
    """A member name as one file name (a foreign set may keep shards in sub-folders)."""
    return name.replace("/", "__")


class Hold:
    """A shared lock on a cached shard: no process evicts it while held. close() releases it."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            _release(self.fd)  # closing the descriptor releases its flock
            self.fd = None


class ShardCache:
    """Shards of `remote` in `folder`, at most about `budget_bytes` of them (shards in use may
    hold it over; see `evict`). Picklable: a copy in another process shares the folder."""

    def __init__(self, remote: Remote, folder: str | Path, budget_bytes: int):
        self.remote, self.budget_bytes = remote, int(budget_bytes)
        self.folder = output_dir(folder, "the shard cache folder")
        (self.folder / _LOCKS).mkdir(exist_ok=True)
        self._start_counts()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_counts"]  # a lock does not cross processes; each copy counts its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._start_counts()

    def local_path(self, name: str, sha256: str) -> Path:
        return self.folder / f"{sha256[:16]}-{_flat(name)}"

    def path(self, name: str, size: int | None, sha256: str) -> str:
        """The local path of shard `name`, fetched and verified first where it is not here."""
        return self.fetch(name, size, sha256)[0]

    def fetch(self, name: str, size: int | None, sha256: str) -> tuple[str, dict | None]:
        """(local path, the download's stats, or None where the shard was here already)."""
        local = self.local_path(name, sha256)
        if _touch(local):
            self._count(hits=1)
            return str(local), None
        with _Lock(self._lock_path(local), fcntl.LOCK_EX, poll=lambda: _touch(local)) as lock:
            if lock.fd is None or _touch(local):  # another process fetched it while this one waited
                self._count(hits=1)
                return str(local), None
            self._count(arriving=size or 0)
            try:
                self.evict(keep=(name,))  # room first: the budget bounds the disk
                got = self.remote.download(name, local, size=size, sha256=sha256)
            finally:
                self._count(arriving=-(size or 0))
        self._count(fetches=1, bytes=got["bytes"], seconds=got["seconds"], retries=got["retries"])
        return str(local), got

    def hold(self, name: str, sha256: str) -> Hold | None:
        """A shared lock on the cached shard (no process evicts it until released), or None
        where it is not (or no longer) here."""
        local = self.local_path(name, sha256)
        lock = _Lock(self._lock_path(local), fcntl.LOCK_SH)
        fd = lock.acquire()
        if not local.exists():
            _release(fd)
            return None
        return Hold(fd)

    def evict(self, keep=(), room: int = 0) -> int:
        """Deletes least recently used shards until the cache, the shards this copy is fetching
        and `room` bytes fit the budget;
        never one named in `keep`, nor one another process fetches or holds (its lock is taken).
        Returns how many it deleted. Deleting a file another process has open or memory-mapped
        is safe on Linux: the name goes, the bytes stay readable to it until it closes them."""
        keep = {_flat(k) for k in keep}
        shards = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                # only the cache's own files (<sha256[:16]>-NAME): the folder may be one a user named
                if not _CACHED.match(entry.name) or entry.name.endswith(".partial") or not entry.is_file():
                    continue
                try:
                    info = entry.stat()
                except FileNotFoundError:  # another process evicted it just now
                    continue
                shards.append((info.st_mtime, info.st_size, entry.name))
        self._after_fork()
        with self._counts:
            total = sum(size for _, size, _ in shards) + room + self._arriving
        deleted = 0
        for _, size, local_name in sorted(shards):
            if total <= self.budget_bytes:
                break
            if local_name.split("-", 1)[-1] in keep:
                continue
            lock = _Lock(self._lock_path(self.folder / local_name), fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                fd = lock.acquire()
            except BlockingIOError:  # being fetched, or held by a consumer
                continue
            try:
                (self.folder / local_name).unlink()
                total -= size
                deleted += 1
            except FileNotFoundError:
                total -= size
            finally:
                _release(fd)
        self._count(evicted=deleted)
        return deleted

    def _start_counts(self) -> None:
        """This process's copy counts from zero, under a lock of its own: the one made here, one
        unpickled in another process, one forked into a DataLoader worker (whose parent's lock may
        have been held by one of its threads at the fork)."""
        self._pid, self._counts = os.getpid(), threading.Lock()
        self._stats = dict.fromkeys(_STATS, 0)
        self._arriving = 0  # bytes of this copy's fetches under way: evictions make room for them all

    def _after_fork(self) -> None:
        """A copy forked into a DataLoader worker (not pickled) counts afresh."""
        if self._pid != os.getpid():
            self._start_counts()

    def stats(self) -> dict:
        """What this process's copy did: fetches, bytes, seconds (summed over fetches), retries, hits, evicted."""
        self._after_fork()
        with self._counts:
            return dict(self._stats)

    def _count(self, arriving: int = 0, **amounts) -> None:
        self._after_fork()
        with self._counts:
            self._arriving += arriving
            for key, amount in amounts.items():
                self._stats[key] += amount

    def _lock_path(self, local: Path) -> Path:
        return self.folder / _LOCKS / (local.name + ".lock")


def _touch(path: Path) -> bool:
    """Marks `path` as just used (the LRU order); False where it is not there."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


class _Lock:
    """flock on a lock file of its own. Two opens are two locks, also in one process: two
    threads of a process exclude each other as two processes do.

    `poll`: wait by polling, not blocking, and stop waiting (fd None) once poll() is true. A fetch
    waits so for the shard's exclusive lock: the process that fetched it first takes a shared hold
    on it at once, and flock may grant that hold before the waiting exclusive lock, which would then
    wait for as long as the hold lasts (a DataLoader worker reaching a shard its loader's prefetcher
    was fetching: the loader holds the shard until the worker's batch comes, the worker waits for
    the loader: a deadlock)."""

    def __init__(self, path: Path, mode: int, poll=None):
        self.path, self.mode, self.poll = path, mode, poll

    def acquire(self) -> int:
        with _FORK_GUARD:  # no fork between the open and the record of it
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise DataError(f"cannot write {self.path}: {e.strerror or e}") from None
            _LOCK_FDS.add(fd)
        try:
            fcntl.flock(fd, self.mode)
        except BaseException:
            _release(fd)
            raise
        return fd

    def __enter__(self):
        if self.poll is None:
            self.fd = self.acquire()
            return self
        mode, self.mode = self.mode, self.mode | fcntl.LOCK_NB
        try:
            while True:
                try:
                    self.fd = self.acquire()
                    return self
                except BlockingIOError:
                    if self.poll():
                        self.fd = None
                        return self
                    time.sleep(0.01)
        finally:
            self.mode = mode

    def __exit__(self, *exc):
        if self.fd is not None:
            _release(self.fd)


# The lock descriptors this process has open. A flock belongs to the open file, which a fork
# shares: a DataLoader worker forked while a prefetch thread holds a shard's lock would hold it
# too, for its whole life, and this process would wait on its own lock. The child closes its
# copies at once (never LOCK_UN, which would release the parent's lock). A fork waits while a
# thread opens or closes one (_FORK_GUARD), so none is open and not yet (or no longer) recorded.
_LOCK_FDS: set[int] = set()
_FORK_GUARD = threading.Lock()


def _release(fd: int) -> None:
    with _FORK_GUARD:
        _LOCK_FDS.discard(fd)
        os.close(fd)


def _close_inherited_locks() -> None:
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()
    _FORK_GUARD.release()  # held across the fork by the forking thread (this one, in the child)


os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release,
                    after_in_child=_close_inherited_locks)


class Prefetcher:
    """Fetches shards of `cache` on `threads` background threads, up to `depth` ahead of the
    consumer. Per epoch: `plan([(name, size, sha256), ...])` in order of use, then `get(name)`
    for each when it is needed. The last shard got and those fetched ahead are held (no process
    evicts them); those behind may be evicted when the budget needs room, which is safe once
    the consumer has them open. A failed fetch is raised by the `get` of that shard, as the
    same one-line DataError; a later `get` of it tries again, and the threads try again those
    ahead that failed with it."""

    def __init__(self, cache: ShardCache, depth: int, threads: int = 4):
        self.cache, self.depth = cache, max(0, int(depth))
        self._cond = threading.Condition()
        self._plan: list[tuple[str, int | None, str]] = []
        self._position: dict[str, int] = {}
        self._next = 0  # the plan position the next free thread takes
        self._last = -1  # the plan position of the last get
        self._done: dict[str, str | BaseException] = {}  # fetched paths (held) and failures, by name
        self._fetching: set[str] = set()
        self._holds: dict[str, Hold] = {}
        self._closed = False
        self._surfaced_at = -1.0  # when the consumer last got a failure
        self._busy, self._busy_since = 0, 0.0
        self._stats = {"fetches": 0, "bytes": 0, "retries": 0, "fetch_seconds": 0.0, "waits": 0, "wait_seconds": 0.0,
                       "gets": 0}
        self._threads = [threading.Thread(target=self._work, name=f"shard-prefetch-{k}", daemon=True)
                         for k in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def plan(self, shards) -> None:
        """The shards of the coming epoch (or of what is left of it, on resume), in order of use."""
        shards = [(name, size, sha256) for name, size, sha256 in shards]
        with self._cond:
            last = self._plan[self._last][0] if 0 <= self._last < len(self._plan) else None
            self._plan, self._position = shards, {}
            for k, (name, _, _) in enumerate(shards):
                self._position.setdefault(name, k)
            self._next, self._last = 0, -1
            self._done = {n: r for n, r in self._done.items() if isinstance(r, str)}  # failures are tried again
            # what the new plan does not want soon is released; the shard in use stays held
            self._release(keep={last} | {name for name, _, _ in shards[:self.depth]})
            self._cond.notify_all()

    def get(self, name: str) -> str:
        """The local path of planned shard `name`, waiting for it where it is not fetched yet."""
        start = time.monotonic()
        with self._cond:
            if name not in self._position:
                raise KeyError(f"{name} is not in the prefetcher's plan")
            k = self._position[name]
            self._stats["gets"] += 1
            if k > self._last:
                self._last = k
                self._next = max(self._next, k)  # the shards skipped are behind the consumer: not fetched
                self._release(keep={n for n, _, _ in self._plan[k:k + self.depth + 1]})
                self._cond.notify_all()
            while name not in self._done and (name in self._fetching or self._next <= k) and not self._closed:
                self._cond.wait()
            result = self._done.get(name)
            if isinstance(result, BaseException):
                # surfaced once; the shards that failed with it (the server was gone for them all)
                # are tried again: by a later get of this one, by the threads for those ahead
                for failed in [n for n, r in self._done.items() if isinstance(r, BaseException)]:
                    del self._done[failed]
                self._surfaced_at = time.monotonic()  # failures of fetches begun before now are dropped too
                self._next = min(self._next, self._last + 1)
                self._cond.notify_all()
        if result is None:  # fetched before and released, or failed before: fetched here
            try:
                result = self._fetch(self._plan[k])
            except BaseException as e:  # noqa: BLE001 - raised below, as a failure in a thread would be
                result = e
            else:
                with self._cond:
                    self._done[name] = result
        waited = time.monotonic() - start
        with self._cond:
            if waited > 1e-3:
                self._stats["waits"] += 1
                self._stats["wait_seconds"] += waited
        if isinstance(result, BaseException):
            raise result
        return result

    def stats(self) -> dict:
        """bytes fetched, fetch_seconds (wall time with a fetch running), link_mb_s, waits and
        wait_seconds (the consumer's), depth, ahead (shards fetched past the last get)."""
        with self._cond:
            stats = dict(self._stats)
            if self._busy:
                stats["fetch_seconds"] += time.monotonic() - self._busy_since
            stats["link_mb_s"] = stats["bytes"] / stats["fetch_seconds"] / 1e6 if stats["fetch_seconds"] > 0 else 0.0
            stats["depth"] = self.depth
            stats["ahead"] = sum(1 for n, _, _ in self._plan[self._last + 1:self._last + 1 + self.depth]
                                 if isinstance(self._done.get(n), str))
        return stats

    def close(self) -> None:
        """Stops the threads (a fetch under way is left to end on its own) and releases the holds."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=1.0)
        with self._cond:
            self._release(keep=set())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inside ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._next < len(self._plan) and self._next <= self._last + self.depth):
                    self._cond.wait()
                if self._closed:
                    return
                item = self._plan[self._next]
                self._next += 1
                if item[0] in self._done or item[0] in self._fetching:
                    continue
                self._fetching.add(item[0])
            started = time.monotonic()
            try:
                result = self._fetch(item)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer's get
                result = e
            with self._cond:
                self._fetching.discard(item[0])
                if not (isinstance(result, BaseException) and started < self._surfaced_at):
                    self._done[item[0]] = result
                self._cond.notify_all()

    def _fetch(self, item) -> str:
        """One shard into the cache, held. Where another process evicts it between the fetch and
        the hold (a budget smaller than what the ranks on the node use at once), fetched again."""
        name, size, sha256 = item
        with self._cond:
            if self._busy == 0:
                self._busy_since = time.monotonic()
            self._busy += 1
        try:
            for _ in range(3):
                path, got = self.cache.fetch(name, size, sha256)
                if got is not None:
                    with self._cond:
                        self._stats["fetches"] += 1
                        self._stats["bytes"] += got["bytes"]
                        self._stats["retries"] += got["retries"]
                hold = self.cache.hold(name, sha256)
                if hold is not None:
                    with self._cond:
                        old = self._holds.pop(name, None)
                        if self._closed:  # closed while this fetch ran: nothing may keep holding it
                            old, hold = hold, None
                        else:
                            self._holds[name] = hold
                    if old is not None:
                        old.close()
                    return path
            raise DataError(f"{self.cache.remote.describe(name)} was evicted from {self.cache.folder} as soon as it "
                            f"arrived, 3 times: the cache budget ({self.cache.budget_bytes / 2**30:.1f} GiB) is too "
                            "small for the shards the processes on this node use at once")
        finally:
            with self._cond:
                self._busy -= 1
                if self._busy == 0:
                    self._stats["fetch_seconds"] += time.monotonic() - self._busy_since

    def _release(self, keep: set) -> None:
        """Releases the holds of shards not in `keep` (called with the condition held)."""
        for name in [n for n in self._holds if n not in keep]:
            self._holds.pop(name).close()
            if isinstance(self._done.get(name), str):
                del self._done[name]  # no longer held: it may go, and a later get fetches it again
