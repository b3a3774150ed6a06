"""Where shards live when `data.shards` is a URL: an HTTP(S) server or an S3 bucket.

A `Remote` is a folder-like prefix (`https://host/set/`, `s3://bucket/set/`) whose members are
read whole (manifest.json, .idx files), downloaded to a local file with their size and sha256
checked on arrival, or uploaded. Every failure a user can cause ends as one DataError line that
names the URL and the cause:
- connection errors, timeouts, 5xx answers and S3 throttling are retried with exponential
  backoff, then "URL unreachable after N tries over S s: CAUSE";
- a missing object is said at once (for manifest.json with how to make one);
- refused credentials name the AWS variables or profile to check, never a secret;
- a transfer that arrives cut short or with other bytes than the manifest's is fetched again
  once, then one line with the expected and received size and digest.

HTTP(S) goes through the standard library. S3 goes through boto3 (the `s3` extra), which takes
the endpoint, region and credentials from the standard AWS variables and files itself
(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/...): nothing of
them is in vae-dist's config, run folder or messages.

A Remote is picklable: DataLoader workers and process pools get a copy and make their own
client, lazily, in their own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urljoin

from vae_dist.errors import DataError, first_line
from vae_dist.files import fsync_dir

SCHEMES = ("http://", "https://", "s3://")
MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_MAX_SLEEP_S = 20.0  # one backoff step never waits longer than this


def is_url(text) -> bool:
    """Whether `text` names a remote shard folder (http://, https://, s3://) rather than a local path."""
    return isinstance(text, str) and text.strip().lower().startswith(SCHEMES)


def folder_url(url: str) -> str:
    """`url` as a folder's URL: stripped, with one trailing slash (members are joined to it)."""
    url = url.strip()
    return url if url.endswith("/") else url + "/"


def open_remote(url: str, *, retries: int = 5, backoff: float = 0.5, timeout: float = 30) -> Remote:
    """The Remote for a folder URL. `retries`: tries in all before a transient failure is
    reported; `backoff`: the first wait between tries (doubled each time); `timeout`: seconds a
    connection or a read may stall."""
    if not is_url(url):
        raise DataError(f"{url} is not a URL (http://, https:// or s3://)")
    kind = S3Remote if url.strip().lower().startswith("s3://") else HTTPRemote
    return kind(folder_url(url), retries=max(1, int(retries)), backoff=backoff, timeout=timeout)


class _Transient(Exception):
    """A failure worth another try (connection, timeout, 5xx, throttling); its text is the cause."""


class _Cut(Exception):
    """The body ended before its announced length (S3 says so itself; HTTP reads end early)."""


class Remote:
    """A folder-like prefix at `url`. Subclasses say how one request is made (`_get`, `_head`,
    `_upload`) and how their errors read (`_classify`); the retries, checks and messages are here."""

    def __init__(self, url: str, *, retries: int = 5, backoff: float = 0.5, timeout: float = 30):
        self.url, self.retries, self.backoff, self.timeout = url, retries, backoff, timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def describe(self, name: str) -> str:
        """The full URL of member `name`, for messages."""
        return self.url + name

    # -- the operations -------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        """Member `name` whole (small objects: manifest.json, .idx files)."""

        def read_once():
            with self._get(name) as (body, _):
                try:
                    return body.read()
                except _Cut:
                    raise _Transient("the transfer was cut short") from None

        data, _ = self._retrying(name, read_once)
        return data

    def exists(self, name: str) -> bool:
        """Whether member `name` is there (a missing one is False, any other failure one line)."""
        try:
            self._retrying(name, lambda: self._head(name))
        except _Missing:
            return False
        return True

    def download(self, name: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> dict:
        """Member `name` into `dest`: streamed into `dest.partial` while hashed, renamed to `dest`
        only when its size and sha256 match `size` and `sha256` (each where given; the size the
        server announced where `size` is not). A mismatch is fetched again once, then one line.
        Returns {"bytes", "seconds", "retries"} (retries: every try past the first)."""
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        start, retries = time.monotonic(), 0
        try:
            for attempt in range(2):
                (received, digest, announced), tries = self._retrying(name, lambda: self._fetch(name, partial))
                retries += tries - 1 + attempt
                want_size = size if size is not None else announced
                if (want_size is None or received == want_size) and (sha256 is None or digest == sha256):
                    _durable_rename(partial, dest)
                    return {"bytes": received, "seconds": time.monotonic() - start, "retries": retries}
        finally:
            partial.unlink(missing_ok=True)
        expected = f"{want_size if want_size is not None else '?'} bytes" + (f" with sha256 {sha256[:16]}" if sha256 else "")
        raise DataError(f"{self.describe(name)}: received {received} bytes with sha256 {digest[:16]}, "
                        f"expected {expected}, twice (a transfer cut short, or the object at the source differs "
                        f"from the manifest: pack or index it again)")

    def list(self, suffix: str = ".tar") -> list[tuple[str, int | None]]:
        """The folder's own members whose names end in `suffix`, sorted: [(name, bytes or None
        where the listing does not say)]. `vae-dist index URL` finds the tars so."""
        raise NotImplementedError

    def read_json(self, name: str):
        """Member `name` parsed as JSON, None where it does not parse: what a writer (pack, index
        beside the tars) checks of a manifest.json there before it replaces it."""
        try:
            return json.loads(self.read(name))
        except ValueError:
            return None

    def probe_write(self, tag: str) -> None:
        """Writes and removes an empty member (`.vae-dist-TAG-probe-NS`): a prefix that takes no
        write (read-only or refused credentials, a missing bucket) is the upload's one-line
        DataError now, before the work that would write there."""
        probe = f".vae-dist-{tag}-probe-{time.time_ns()}"
        with tempfile.NamedTemporaryFile() as empty:
            self.upload(Path(empty.name), probe)
        self.delete(probe)

    def publish(self, folder: Path, names, *, stale=(), on_upload=None) -> None:
        """A set written in the local `folder` (pack's, or an index's) to this prefix, so that a
        reader sees the old set whole, no set (one line: no manifest.json there), or the new set
        whole, never a manifest naming files not yet there: the old manifest.json is taken away
        first, then `names` are uploaded (`on_upload(n, name)` after the n-th), the old set's
        `stale` files removed, and the new manifest.json uploaded last."""
        self.delete(MANIFEST)
        for n, name in enumerate(names, start=1):
            self.upload(folder / name, name)
            if on_upload is not None:
                on_upload(n, name)
        for name in stale:
            self.delete(name)
        self.upload(folder / MANIFEST, MANIFEST)

    def delete(self, name: str) -> None:
        """Member `name` removed (gone already is fine): `publish` takes an old manifest.json away first."""
        raise self._read_only(name)

    def upload(self, src: Path, name: str) -> None:
        """Local file `src` to member `name`."""
        raise self._read_only(name)

    def _read_only(self, name: str) -> DataError:
        return DataError(f"cannot write to an http(s) URL ({self.describe(name)}): upload to s3://, "
                         "or copy the folder to the server by its own means")

    # -- retries and messages -------------------------------------------------------------

    def _retrying(self, name: str, attempt):
        """(attempt()'s result, tries it took): transient failures are tried again after
        backoff, 2*backoff, ... up to self.retries tries in all, then one line."""
        start = time.monotonic()
        for n in range(1, self.retries + 1):
            try:
                return attempt(), n
            except DataError:  # said at once: missing, refused, a local file
                raise
            except Exception as e:  # noqa: BLE001 - each one is classified below, the rest re-raised
                cause = self._transient_cause(e)
                if cause is None:
                    raise self._permanent(name, e) from None
            if n < self.retries:
                # jitter: ranks that lost the server together do not come back in step
                time.sleep(min(_MAX_SLEEP_S, self.backoff * 2 ** (n - 1)) * random.uniform(0.8, 1.2))
        raise self._unreachable(name, start, cause)

    def _unreachable(self, name: str, start: float, cause: str) -> DataError:
        """The one line for a transient failure that lasted through every try (since `start`)."""
        return DataError(f"{self.describe(name)} unreachable after {self.retries} tries over "
                         f"{_seconds(time.monotonic() - start)}: {cause}")

    def _transient_cause(self, e: Exception) -> str | None:
        """Why `e` is worth another try, or None where it is not."""
        if isinstance(e, _Transient):
            return str(e)
        return _network_cause(e)

    def _permanent(self, name: str, e: Exception) -> Exception:
        """The one line for a failure that another try would not mend."""
        return DataError(f"{self.describe(name)}: {first_line(e)}")

    def _missing(self, name: str) -> Exception:
        if name == MANIFEST:
            make = (f"pack there with `vae-dist pack SRC {self.url}`" if isinstance(self, S3Remote)
                    else "copy a packed shard folder there")
            return _Missing(f"no {MANIFEST} at {self.url} ({make}, or index foreign shards with "
                            f"`vae-dist index {self.url}`)")
        return _Missing(f"missing shard {self.describe(name)}: the manifest names it but the server has "
                        "no such object (an incomplete upload or copy)")

    def _fetch(self, name: str, partial: Path) -> tuple[int, str, int | None]:
        """One try at streaming `name` into `partial`: (bytes received, their sha256, the length
        the server announced). A body cut short is returned as it came (the caller compares it)."""
        digest, received = hashlib.sha256(), 0
        with self._get(name) as (body, announced), _local(partial, "wb") as out:
            try:
                for block in iter(lambda: body.read(_CHUNK), b""):
                    digest.update(block)
                    received += len(block)
                    _write(out, block, partial)
            except _Cut:
                pass
            _flush(out, partial)
        return received, digest.hexdigest(), announced

    # subclasses: _get(name) -> context manager of (readable body, announced length or None),
    # _head(name), _classify errors via _transient_cause / _permanent


class _Missing(DataError):
    """A member that is not there: said at once, no retries."""


# -- local files ---------------------------------------------------------------------------


class _local:
    """`open(path, mode)` whose OSError (a full disk, a read-only cache folder) is one line about
    the local file, never mistaken for a network failure and retried."""

    def __init__(self, path: Path, mode: str):
        self.path, self.mode = path, mode

    def __enter__(self):
        try:
            self.file = open(self.path, self.mode)  # noqa: SIM115 - closed in __exit__
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror or e}") from None
        return self.file

    def __exit__(self, *exc):
        self.file.close()


def _write(out, block: bytes, path: Path) -> None:
    try:
        out.write(block)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None


def _flush(out, path: Path) -> None:
    try:
        out.flush()
        os.fsync(out.fileno())  # a name in the cache promises verified bytes, also after a power loss
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None


def _durable_rename(partial: Path, dest: Path) -> None:
    try:
        os.replace(partial, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        raise DataError(f"cannot write {dest}: {e.strerror or e}") from None


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def _network_cause(e: BaseException) -> str | None:
    """The cause of a connection-level failure ("Connection refused", "timed out"), or None."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
        if isinstance(e, str):
            return e
    if isinstance(e, ssl.SSLCertVerificationError):  # another try would not mend it
        return None
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, OSError):
        return e.strerror or first_line(e)
    import http.client

    if isinstance(e, http.client.HTTPException):  # RemoteDisconnected, IncompleteRead, BadStatusLine
        return first_line(e) if str(e) else type(e).__name__
    return None


# -- HTTP(S) -------------------------------------------------------------------------------


class _Response:
    """An urlopen response as (body, announced length), closed on exit."""

    def __init__(self, open_response):
        self.open_response = open_response

    def __enter__(self):
        self.response = self.open_response()
        length = self.response.headers.get("Content-Length")
        return self.response, int(length) if length and length.isdigit() else None

    def __exit__(self, *exc):
        self.response.close()


class HTTPRemote(Remote):
    """A folder on an HTTP(S) server, read with the standard library (GET and HEAD only)."""

    def _request(self, name: str, method: str):
        url = self.url + quote(name)
        try:
            return urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404:
                raise self._missing(name) from None
            if e.code >= 500 or e.code == 429:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            if e.code in (401, 403):
                raise DataError(f"{self.describe(name)}: access refused (HTTP {e.code} {e.reason}): "
                                "the server needs a login that vae-dist does not send") from None
            raise DataError(f"{self.describe(name)}: HTTP {e.code} {e.reason}") from None

    def _get(self, name: str):
        return _Response(lambda: self._request(name, "GET"))

    def _head(self, name: str) -> None:
        self._request(name, "HEAD").close()

    def list(self, suffix: str = ".tar") -> list[tuple[str, int | None]]:
        """HTTP has no standard listing: the links of the server's HTML index of the folder (an
        autoindex: Python's http.server, nginx's `autoindex on`) that name a member of it. Sizes
        are not said (autoindex pages round them)."""
        try:
            page = self.read("")
        except _Missing:
            raise DataError(f"{self.url}: the server has no listing of this folder (HTTP 404): name the tars in "
                            f"WebDataset's brace notation instead, e.g. '{self.url}{{00000..00009}}.tar'") from None
        links = _Links()
        links.feed(page.decode("utf-8", errors="replace"))
        names = set()
        for href in links.hrefs:
            url = urljoin(self.url, href.split("#")[0].split("?")[0])
            name = unquote(url[len(self.url):]) if url.startswith(self.url) else ""
            if name.endswith(suffix) and "/" not in name:
                names.add(name)
        return [(name, None) for name in sorted(names)]


class _Links(HTMLParser):
    """The href of every <a> of an HTML page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for key, value in attrs if key == "href" and value]


# -- S3 ------------------------------------------------------------------------------------

_S3_MISSING = {"NoSuchKey", "404", "NotFound"}
_S3_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
               "InvalidToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidClientTokenId"}
_S3_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                 "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}
_MULTIPART_BYTES = 8 << 20


class S3Remote(Remote):
    """A prefix in an S3 bucket (AWS or any S3-compatible server at AWS_ENDPOINT_URL), via boto3."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if len(bucket) < 3:
            raise DataError(f"{url}: no bucket name (s3://BUCKET/PREFIX/, 3 characters or more)")
        self.bucket, self.prefix = bucket, prefix
        self._clients = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_clients"] = None  # sessions and connections are per process: made again there
        return state

    def _client(self, kind: str = "read"):
        """boto3 clients of this process, made at first use. Reads are retried by `_retrying`
        (boto3's own retries off, so the tries and waits are ours and the message counts them);
        uploads by boto3 per part, so a lost part of a large file is sent again alone."""
        clients = self._clients
        if clients is None or clients[0] != os.getpid():
            with _S3_LOCK:
                if self._clients is None or self._clients[0] != os.getpid():
                    self._clients = (os.getpid(), *_new_clients(self))
            clients = self._clients
        return clients[1] if kind == "read" else clients[2]

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _get(self, name: str):
        remote = self

        class Body:
            def __enter__(self):
                answer = remote._client().get_object(Bucket=remote.bucket, Key=remote._key(name))
                self.body = answer["Body"]
                return _S3Body(self.body), answer.get("ContentLength")

            def __exit__(self, *exc):
                self.body.close()

        return Body()

    def _head(self, name: str) -> None:
        self._client().head_object(Bucket=self.bucket, Key=self._key(name))

    def list(self, suffix: str = ".tar") -> list[tuple[str, int | None]]:
        """The prefix's own objects (not those under a deeper '/') ending in `suffix`, a page of
        up to 1000 at a time, each page retried as any read."""
        found, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page, _ = self._retrying("", lambda extra=extra: self._client().list_objects_v2(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/", **extra))
            found += [(item["Key"][len(self.prefix):], int(item["Size"])) for item in page.get("Contents", [])
                      if item["Key"].endswith(suffix)]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(found)

    def delete(self, name: str) -> None:
        self._retrying(name, lambda: self._client().delete_object(Bucket=self.bucket, Key=self._key(name)))

    def upload(self, src: Path, name: str) -> None:
        from boto3.s3.transfer import TransferConfig

        # multipart above 8 MiB: parts go in parallel, and a failed part is sent again alone
        config = TransferConfig(multipart_threshold=_MULTIPART_BYTES, multipart_chunksize=_MULTIPART_BYTES,
                                max_concurrency=4, use_threads=True)
        start = time.monotonic()
        try:
            self._client("upload").upload_file(str(src), self.bucket, self._key(name), Config=config)
        except FileNotFoundError:
            raise DataError(f"cannot upload {src}: no such file") from None
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - classified: the cause is in the one line
            # boto3's S3UploadFailedError says the client's error in words; the error itself is its context
            error = e.__cause__ or e.__context__ if type(e).__name__ == "S3UploadFailedError" else e
            error = error if isinstance(error, Exception) else e
            cause = self._transient_cause(error)
            if cause is not None:  # boto3 tried `retries` times itself
                raise self._unreachable(name, start, cause) from None
            raise self._permanent(name, error) from None

    def _transient_cause(self, e: Exception) -> str | None:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        if isinstance(e, ClientError):
            code, status = _code(e)
            if code in _S3_THROTTLED or status >= 500:
                return f"{code} (HTTP {status})"
            return None
        if isinstance(e, (ConnectionError, HTTPClientError)):
            return first_line(e)
        return super()._transient_cause(e)

    def _permanent(self, name: str, e: Exception) -> Exception:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return DataError(f"{self.describe(name)}: no AWS credentials found ({first_line(e)}): set "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile in "
                             "~/.aws/credentials")
        if isinstance(e, ClientError):
            code, status = _code(e)
            if code in _S3_MISSING:
                return self._missing(name)
            if code == "NoSuchBucket":
                return DataError(f"{self.describe(name)}: no bucket {self.bucket} at {self._endpoint()}")
            if code in _S3_REFUSED or status == 403:
                return DataError(f"{self.describe(name)}: credentials refused ({code}) by {self._endpoint()}: "
                                 f"check {self._credential_source()}")
            return DataError(f"{self.describe(name)}: {code} (HTTP {status})")
        return super()._permanent(name, e)

    def _endpoint(self) -> str:
        return self._client().meta.endpoint_url

    def _credential_source(self) -> str:
        """Where boto3 found the key it sent (never the key itself)."""
        profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
        files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials") + ", "
                 + os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
        try:
            import boto3

            credentials = boto3.session.Session().get_credentials()
            method = credentials.method if credentials is not None else None
        except Exception:  # noqa: BLE001 - only for the message
            method = None
        if method == "env":
            return "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment"
        if method in ("shared-credentials-file", "config-file"):
            return f"the profile {profile} (AWS_PROFILE) in {files}"
        if method:
            return f"the credentials boto3 found by {method}, AWS_PROFILE and {files}"
        return f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and {files}"


_S3_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    """A fork copies a lock as it is: one a prefetch thread held at that moment (making its
    clients) would stay held in a forked DataLoader worker, which then waits on it for ever."""
    global _S3_LOCK
    _S3_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _new_clients(remote: S3Remote):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise DataError(f"{remote.url}: s3:// URLs need boto3: pip install 'vae-dist[s3]'") from None
    session = boto3.session.Session()  # a session is not thread-safe; its clients are
    common = dict(connect_timeout=remote.timeout, read_timeout=remote.timeout, max_pool_connections=32)
    read = session.client("s3", config=Config(retries={"total_max_attempts": 1}, **common))
    upload = session.client("s3", config=Config(retries={"mode": "standard", "total_max_attempts": remote.retries},
                                                **common))
    return read, upload


def _code(e) -> tuple[str, int]:
    error = e.response.get("Error", {})
    return str(error.get("Code", "")), int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class _S3Body:
    """A StreamingBody whose early end (botocore checks the length itself) reads as `_Cut`."""

    def __init__(self, body):
        self.body = body

    def read(self, amount: int | None = None) -> bytes:
        from botocore.exceptions import IncompleteReadError

        try:
            return self.body.read(amount)
        except IncompleteReadError:
            raise _Cut() from None
