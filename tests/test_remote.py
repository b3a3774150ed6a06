"""Shards at a URL: reads and verified downloads from a real HTTP server and a real S3 API server
(moto's) on the loopback, with the faults a link has; the bounded local shard cache shared by
processes; the prefetcher. Files are a few KB and backoff 10 ms, so faults cost milliseconds."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import pytest

from vae_dist.data.remote import is_url, open_remote
from vae_dist.data.shard_cache import Prefetcher, ShardCache, default_folder
from vae_dist.errors import DataError


def _serve(folder: Path, name: str, size: int = 4096, seed: int = 0) -> tuple[str, int, str]:
    """A file of `size` random bytes at folder/name; its (name, size, sha256) as a manifest says them."""
    data = os.urandom(size) if seed == 0 else bytes((seed * k) % 251 for k in range(size))
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return name, size, hashlib.sha256(data).hexdigest()


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_urls_are_told_from_paths():
    # issue 45: data.shards may be a URL; a local path stays a path
    assert is_url("https://h/set/") and is_url("http://h/x") and is_url("s3://bucket/set/") and is_url(" S3://b/p")
    assert not is_url("shards/") and not is_url("/data/s3:/x") and not is_url(Path("s3:/x"))
    assert open_remote("https://h/set").describe("a.tar") == "https://h/set/a.tar"


def test_http_download_is_verified_and_leaves_no_partial(http_server, tmp_path):
    # issue 45: a download lands under its name only verified, with its stats
    name, size, sha = _serve(http_server.root, "set/train-000000.tar")
    remote = open_remote(http_server.url + "set/", backoff=0.01)
    got = remote.download(name.split("/")[1], tmp_path / "a.tar", size=size, sha256=sha)
    assert got["bytes"] == size and got["retries"] == 0 and got["seconds"] > 0
    assert hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest() == sha
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]
    assert remote.exists("train-000000.tar") and not remote.exists("train-000001.tar")
    assert remote.read("train-000000.tar") == (http_server.root / name).read_bytes()


def test_http_server_stopped_is_one_line_then_a_new_download_completes(http_server, tmp_path):
    # issue 45: the server stopped mid-epoch: retries with backoff, then one line naming the URL; after it
    # comes back a new download continues and completes
    name, size, sha = _serve(http_server.root, "a.tar")
    remote = open_remote(http_server.url, retries=4, backoff=0.02)
    http_server.stop()
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        remote.download(name, tmp_path / "a.tar", size=size, sha256=sha)
    line = _one_line(e)
    assert line.startswith(f"{http_server.url}a.tar unreachable after 4 tries over ") and line.endswith(": Connection refused")
    assert time.monotonic() - start >= 0.8 * (0.02 + 0.04 + 0.08)  # the backoff waited between tries
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
    http_server.start()
    assert remote.download(name, tmp_path / "a.tar", size=size, sha256=sha)["bytes"] == size


def test_http_500_is_retried_and_survived(http_server, tmp_path):
    # issue 45: a 500 answer: retried, survived, the retries counted
    name, size, sha = _serve(http_server.root, "a.tar")
    remote = open_remote(http_server.url, backoff=0.01)
    http_server.fail_next(2)
    assert remote.download(name, tmp_path / "a.tar", size=size, sha256=sha)["retries"] == 2
    http_server.fail_next(1)
    assert remote.read(name) == (http_server.root / name).read_bytes()
    http_server.fail_next(9)
    with pytest.raises(DataError) as e:
        remote.read(name)
    line = _one_line(e)
    assert line.startswith(f"{http_server.url}a.tar unreachable after 5 tries over ")
    assert line.endswith(" s: HTTP 500 Internal Server Error (injected)")


def test_http_transfer_cut_short_is_fetched_again(http_server, tmp_path):
    # issue 45: a transfer cut short: the digest (and size) mismatch is fetched again, right bytes in the end
    name, size, sha = _serve(http_server.root, "a.tar", size=40_000)
    remote = open_remote(http_server.url, backoff=0.01)
    http_server.cut_next(name)
    got = remote.download(name, tmp_path / "a.tar", size=size, sha256=sha)
    assert got["retries"] == 1 and http_server.requests[name] == 2
    assert hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest() == sha
    # without a size the server's Content-Length tells the cut
    http_server.cut_next(name)
    assert remote.download(name, tmp_path / "b.tar")["bytes"] == size


def test_http_transfer_cut_twice_is_one_line(http_server, tmp_path):
    # issue 45: cut again on the second fetch: one line with the URL, expected and received size and digest
    name, size, sha = _serve(http_server.root, "a.tar", size=40_000)
    remote = open_remote(http_server.url, backoff=0.01)
    http_server.cut_next(name, times=2)
    with pytest.raises(DataError) as e:
        remote.download(name, tmp_path / "a.tar", size=size, sha256=sha)
    line = _one_line(e)
    assert line.startswith(f"{http_server.url}a.tar: received 20000 bytes with sha256 ")
    assert f"expected 40000 bytes with sha256 {sha[:16]}, twice" in line
    assert list(tmp_path.iterdir()) == []


def test_http_slow_link_completes_and_shows_the_time(http_server, tmp_path):
    # issue 45: a slow link (a throttled server): nothing fails, the stats show the time
    name, size, sha = _serve(http_server.root, "a.tar", size=32_000)
    http_server.throttle(100_000)  # bytes/s: 0.32 s for the file
    got = open_remote(http_server.url, backoff=0.01).download(name, tmp_path / "a.tar", size=size, sha256=sha)
    assert got["retries"] == 0 and got["seconds"] >= 0.25
    assert got["bytes"] / got["seconds"] < 130_000


def test_missing_manifest_is_one_line_http(http_server):
    # issue 45: a missing manifest: one line that says how to make one
    with pytest.raises(DataError) as e:
        open_remote(http_server.url + "set/", backoff=0.01).read("manifest.json")
    assert _one_line(e) == (f"no manifest.json at {http_server.url}set/ (copy a packed shard folder there, "
                            f"or index foreign shards with `vae-dist index {http_server.url}set/`)")
    assert http_server.requests["set/manifest.json"] == 1  # a 404 is not retried


def test_missing_manifest_and_shard_are_one_line_s3(s3, tmp_path):
    # issue 45: a missing manifest at an s3:// URL names the pack and index commands; a missing shard, the shard
    remote = open_remote(s3.url("set"), backoff=0.01)
    with pytest.raises(DataError) as e:
        remote.read("manifest.json")
    assert _one_line(e) == (f"no manifest.json at {s3.url('set')} (pack there with `vae-dist pack SRC {s3.url('set')}`, "
                            f"or index foreign shards with `vae-dist index {s3.url('set')}`)")
    with pytest.raises(DataError) as e:
        remote.download("train-000003.tar", tmp_path / "never", size=1, sha256="0" * 64)
    assert _one_line(e).startswith(f"missing shard {s3.url('set')}train-000003.tar: ")


def test_s3_round_trip_multipart_upload_and_verified_download(s3, tmp_path):
    # issue 45: S3 through the real client: upload (multipart above 8 MiB), read, exists, verified download
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(9 << 20))
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    remote = open_remote(s3.url("set"), backoff=0.01)
    remote.upload(big, "train-000000.tar")
    remote.upload(tmp_path / "big.tar", "sub/x.tar")
    head = s3.client.head_object(Bucket=s3.name, Key="set/train-000000.tar")
    assert head["ContentLength"] == 9 << 20 and head["ETag"].strip('"').endswith("-2")  # two parts
    assert remote.exists("train-000000.tar") and not remote.exists("manifest.json")
    got = remote.download("train-000000.tar", tmp_path / "copy.tar", size=9 << 20, sha256=sha)
    assert got["bytes"] == 9 << 20 and (tmp_path / "copy.tar").read_bytes() == big.read_bytes()
    s3.put("set/manifest.json", b'{"x": 1}')
    assert remote.read("manifest.json") == b'{"x": 1}'


def test_s3_unreachable_is_one_line(s3, monkeypatch):
    # issue 45: an S3 endpoint that is down: retried, then one line naming the URL and the cause
    from .servers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DataError) as e:
        open_remote("s3://bucket/set/", retries=3, backoff=0.01).read("manifest.json")
    assert _one_line(e).startswith("s3://bucket/set/manifest.json unreachable after 3 tries over ")
    assert "Could not connect to the endpoint URL" in _one_line(e)


def test_s3_credentials_refused_is_one_line_without_the_secret(moto_checking_credentials, monkeypatch, tmp_path):
    # issue 45: credentials refused: one line naming the URL and what to check, never the secret
    from .conftest import aws_env

    env = aws_env(monkeypatch, moto_checking_credentials.endpoint)
    remote = open_remote("s3://bucket/set/", backoff=0.01)
    for attempt in (lambda: remote.read("manifest.json"), lambda: remote.upload(Path(__file__), "x.py")):
        with pytest.raises(DataError) as e:
            attempt()
        line = _one_line(e)
        assert line.startswith("s3://bucket/set/") and ": credentials refused (InvalidAccessKeyId) by " in line
        assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
        assert env["AWS_SECRET_ACCESS_KEY"] not in line and env["AWS_ACCESS_KEY_ID"] not in line
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DataError) as e:
        open_remote("s3://bucket/set/", backoff=0.01).read("manifest.json")
    assert _one_line(e).startswith("s3://bucket/set/manifest.json: no AWS credentials found")


def test_http_cannot_be_written(http_server, tmp_path):
    # issue 45: pack to an http URL is refused in one line
    with pytest.raises(DataError) as e:
        open_remote(http_server.url).upload(Path(__file__), "x.py")
    assert _one_line(e).startswith(f"cannot write to an http(s) URL ({http_server.url}x.py)")


def test_remote_and_cache_pickle_after_use(s3, tmp_path):
    # issue 45: DataLoader workers and process pools get copies: clients are made again there
    name, size, sha = _serve(tmp_path, "a.tar")
    s3.put_folder(tmp_path, "set")
    cache = ShardCache(open_remote(s3.url("set"), backoff=0.01), tmp_path / "cache", 1 << 20)
    cache.path(name, size, sha)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.remote.read(name) == (tmp_path / name).read_bytes()
    assert copy.path(name, size, sha) == cache.path(name, size, sha)
    # each copy counts its own: the copy found the shard there, the original fetched it
    assert (copy.stats()["fetches"], copy.stats()["hits"]) == (0, 1) and cache.stats()["fetches"] == 1


def test_cache_is_content_addressed_and_fetches_once(http_server, tmp_path):
    # issue 45: a shard is fetched once, then served locally; one replaced at the source has a new name
    name, size, sha = _serve(http_server.root, "a.tar")
    cache = ShardCache(open_remote(http_server.url, backoff=0.01), tmp_path / "cache", 1 << 20)
    first = cache.path(name, size, sha)
    assert Path(first).name == f"{sha[:16]}-a.tar" and cache.path(name, size, sha) == first
    assert http_server.requests[name] == 1 and cache.stats()["hits"] == 1
    _, size2, sha2 = _serve(http_server.root, "a.tar", size=5000)  # replaced at the source
    second = cache.path(name, size2, sha2)
    assert second != first and Path(second).read_bytes() == (http_server.root / name).read_bytes()
    # a manifest that disagrees with the source: one line, nothing cached
    stale = ShardCache(cache.remote, tmp_path / "other", 1 << 20)
    with pytest.raises(DataError) as e:
        stale.path(name, size, sha)
    assert _one_line(e).endswith("twice (a transfer cut short, or the object at the source differs from the manifest: "
                                 "pack or index it again)")
    assert [p for p in stale.folder.iterdir() if p.is_file()] == []


def test_cache_evicts_least_recently_used_never_keep(http_server, tmp_path):
    # issue 45: the cache's bound: LRU shards go first, never those kept
    items = [_serve(http_server.root, f"s{k}.tar", size=1000) for k in range(5)]
    cache = ShardCache(open_remote(http_server.url, backoff=0.01), tmp_path / "cache", 3000)
    paths = [cache.path(*item) for item in items[:3]]
    past = time.time() - 100
    for k, path in enumerate(paths):  # use order: s1 oldest, then s0, then s2
        os.utime(path, (past + [10, 0, 20][k],) * 2)
    cache.path(*items[3])  # room for one: s1 (least recently used) goes
    assert [Path(p).exists() for p in paths] == [True, False, True]
    assert cache.evict(keep=["s0.tar", "s2.tar", "s3.tar"]) == 0  # at the budget already
    cache.budget_bytes = 1000
    assert cache.evict(keep=["s0.tar"]) == 2  # s2 and s3 go, s0 (older) is kept
    assert sorted(p.name.split("-", 1)[1] for p in cache.folder.iterdir() if p.is_file()) == ["s0.tar"]


def test_cache_holds_are_not_evicted(http_server, tmp_path):
    # issue 45: a shard in use (held) is not evicted, by this process or another one
    items = [_serve(http_server.root, f"s{k}.tar", size=1000) for k in range(2)]
    cache = ShardCache(open_remote(http_server.url, backoff=0.01), tmp_path / "cache", 1000)
    first = cache.path(*items[0])
    hold = cache.hold(items[0][0], items[0][2])
    cache.path(*items[1])
    assert Path(first).exists()
    hold.close()
    assert cache.evict() == 1 and not Path(first).exists()


def _fetch_in_child(cache_bytes: bytes, item, results) -> None:
    cache = pickle.loads(cache_bytes)
    results.put(cache.path(*item))


def test_cache_two_processes_fetch_a_shard_once(http_server, tmp_path):
    # issue 45: two processes (two ranks on a node, or DataLoader workers) fetch one shard once; the other waits
    item = _serve(http_server.root, "a.tar", size=30_000)
    http_server.throttle(100_000)  # 0.3 s: the two processes overlap
    cache = pickle.dumps(ShardCache(open_remote(http_server.url, backoff=0.01), tmp_path / "cache", 1 << 20))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_fetch_in_child, args=(cache, item, results)) for _ in range(2)]
    for child in children:
        child.start()
    paths = [results.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert paths[0] == paths[1] and hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest() == item[2]
    assert http_server.requests["a.tar"] == 1


def test_a_fetch_waiting_on_a_shard_returns_once_its_fetcher_holds_it(http_server, tmp_path):
    # issue 45: a DataLoader worker reaching a shard its loader's prefetcher is fetching waits, then
    # reads it; the prefetcher's shared hold, taken as its fetch ends, does not keep the worker waiting
    # (flock may grant the hold before the waiting exclusive lock: `bench data --shards URL` over a
    # throttled link deadlocked so, the loader holding the shard until the worker's batch came)
    import fcntl
    import threading

    item = _serve(http_server.root, "a.tar", size=3000)
    cache = ShardCache(open_remote(http_server.url, backoff=0.01), tmp_path / "cache", 1 << 20)
    local = cache.local_path(item[0], item[2])
    fd = os.open(cache._lock_path(local), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the prefetcher, fetching
    got = []
    worker = threading.Thread(target=lambda: got.append(cache.fetch(*item)), daemon=True)
    worker.start()
    time.sleep(0.2)
    assert not got  # it waits while the shard is on its way
    local.write_bytes((http_server.root / "a.tar").read_bytes())  # arrived
    fcntl.flock(fd, fcntl.LOCK_SH)  # the fetcher's hold, at once (a conversion: never unlocked between)
    worker.join(timeout=5)
    assert got == [(str(local), None)], "the fetch still waits for the holder's shared lock"
    assert http_server.requests.get("a.tar", 0) == 0 and cache.stats()["hits"] == 1
    os.close(fd)


def test_a_batch_spanning_more_shards_than_the_cache_holds_gets_each_while_it_is_there(http_server, tmp_path):
    # issue 45: a streaming loader's batch reads a block of shards; each is handed over while it is on
    # disk and held, so the loader opens it before the fetch of the next one may evict it (DALI failed
    # with "No such file" for a tar it had been given, `bench data --shards URL`, block 16, depth 4)
    import numpy as np

    from vae_dist.data.fetch import StreamFeed, TarFetch
    from vae_dist.data.partition import shard_of

    items = [_serve(http_server.root, f"s{k}.tar", size=2000) for k in range(4)]
    cache = ShardCache(open_remote(http_server.url, backoff=0.01), tmp_path / "cache", 2 * 2000)  # 2 of 4
    fetch = TarFetch(cache, [{"file": n, "bytes": b, "sha256": h} for n, b, h in items])
    feed = StreamFeed(fetch, 1, shard_of([2, 2, 2, 2]))
    ids = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # one batch: all four shards
    feed.start(ids, batch_size=8)
    opened = []
    for t in dict.fromkeys(feed.shard_of[ids].tolist()):
        with open(feed.path(t), "rb") as f:  # as the loader maps it, before it asks for the next
            opened.append((t, hashlib.sha256(f.read()).hexdigest()))
    assert opened == [(t, items[t][2]) for t in range(4)]
    feed.close()


def test_a_process_forked_while_locks_come_and_go_inherits_none(tmp_path):
    # issue 45: a DataLoader worker forked while a prefetch thread opens or closes a shard's lock file
    # kept that open file, and with it the lock, for its whole life: the loader then waited on it for
    # ever (`bench data --shards URL`, webdataset). Forks race a thread taking and dropping locks.
    import fcntl
    import threading

    from vae_dist.data.shard_cache import _Lock

    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with _Lock(tmp_path / "a.lock", fcntl.LOCK_EX):
                pass

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    leaked = 0
    try:
        for _ in range(100):
            pid = os.fork()
            if pid == 0:  # the child: does it have the lock file open?
                held = any(os.path.realpath(f"/proc/self/fd/{fd}").endswith("a.lock") for fd in os.listdir("/proc/self/fd"))
                os._exit(1 if held else 0)
            _, status = os.waitpid(pid, 0)
            leaked += os.waitstatus_to_exitcode(status) != 0
    finally:
        stop.set()
        thread.join()
    assert leaked == 0, f"{leaked} of 100 forked processes kept a lock file open"


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prefetcher_keeps_depth_ahead_and_reports_waits(http_server, tmp_path):
    # issue 45: the prefetcher fetches `depth` shards ahead of the consumer (not more), evicts behind it
    # when the budget needs room, and counts the consumer's waits
    items = [_serve(http_server.root, f"s{k}.tar", size=2000) for k in range(6)]
    cache = ShardCache(open_remote(http_server.url, backoff=0.01), tmp_path / "cache", 3 * 2000)
    with Prefetcher(cache, depth=2, threads=2) as prefetcher:
        prefetcher.plan(items)
        _wait_for(lambda: prefetcher.stats()["ahead"] == 2)
        time.sleep(0.1)
        assert sorted(http_server.requests) == ["s0.tar", "s1.tar"]  # two ahead, no more
        path = prefetcher.get("s0.tar")
        assert Path(path).read_bytes() == (http_server.root / "s0.tar").read_bytes()
        _wait_for(lambda: "s2.tar" in http_server.requests)
        http_server.throttle(10_000)  # 0.2 s a shard from now: the consumer outruns the link
        for name, _, _ in items[1:]:
            assert Path(prefetcher.get(name)).stat().st_size == 2000
        stats = prefetcher.stats()
        assert stats["fetches"] == 6 and stats["bytes"] == 6 * 2000 and stats["depth"] == 2
        assert stats["waits"] >= 1 and stats["wait_seconds"] >= 0.1 and stats["link_mb_s"] > 0
        assert all(count == 1 for count in http_server.requests.values())
        on_disk = [p for p in cache.folder.iterdir() if p.is_file()]
        assert len(on_disk) <= 3 and any(p.name.endswith("-s5.tar") for p in on_disk)  # the budget held, the last kept


def test_prefetcher_failure_surfaces_in_get_then_recovers(http_server, tmp_path):
    # issue 45: a fetch that fails in a thread is the consumer's one line in get; after the server
    # comes back, the same get continues
    items = [_serve(http_server.root, f"s{k}.tar") for k in range(3)]
    cache = ShardCache(open_remote(http_server.url, retries=2, backoff=0.01), tmp_path / "cache", 1 << 20)
    http_server.stop()
    with Prefetcher(cache, depth=2) as prefetcher:
        prefetcher.plan(items)
        with pytest.raises(DataError) as e:
            prefetcher.get("s0.tar")
        assert _one_line(e).startswith(f"{http_server.url}s0.tar unreachable after 2 tries")
        http_server.start()
        for name, _, sha in items:
            assert hashlib.sha256(Path(prefetcher.get(name)).read_bytes()).hexdigest() == sha


def test_default_cache_folder_is_per_user_and_per_url(monkeypatch, tmp_path):
    # issue 45: shards of a URL are cached under the user's cache, a folder per URL
    monkeypatch.delenv("VAE_DIST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = default_folder("s3://b/set")
    assert folder.parent == tmp_path / "vae-dist" / "shards" and folder == default_folder("s3://b/set/")
    assert default_folder("s3://b/other/") != folder


def test_eviction_touches_only_the_caches_own_files(http_server, tmp_path):
    # issue 45 (review): data.shard_cache may name a folder that holds the user's files: never evicted
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.pdf").write_bytes(b"x" * 5000)
    items = [_serve(http_server.root, f"s{k}.tar", size=2000) for k in range(3)]
    cache = ShardCache(open_remote(http_server.url, backoff=0.01), folder, 2500)
    for item in items:
        cache.path(*item)
    assert (folder / "thesis.pdf").read_bytes() == b"x" * 5000
    assert sorted(p.name.split("-", 1)[1] for p in folder.iterdir() if p.name[0] != "." and p.suffix == ".tar") \
        == ["s2.tar"]  # the budget holds one shard: the older two went, the user's file stayed
