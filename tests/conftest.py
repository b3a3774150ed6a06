"""Shared fixtures: the sample data set and its shards, built once per test session (per
pytest-xdist worker), and the ways a test runs `vae-dist`: `run_cli` in this process
(tests/in_process.py; most tests), `run_process` and `launch_command` as real processes where
the process is the point (signals, ranks, a launcher, a fresh interpreter).

On a GPU machine the same suite runs: training runs from the command line stay eager (a
compile per run would take minutes), and every multi-process run is pinned to the CPU with
gloo (`CUDA_VISIBLE_DEVICES=` hides the GPUs), since on a machine with fewer GPUs than
processes accelerate puts two ranks on one GPU and NCCL refuses the duplicate. DDP on real
GPUs is tests/test_gpu.py's, where at least two are present.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_dist.data import available_cores
from vae_dist.distributed import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
# a later --model.compile=true wins (the last value of a key counts)
TINY_MODEL = ["--model.widths=[8,16,16,32]", "--model.latent_dim=8", "--model.compile=false"]
CUDA = torch.cuda.is_available()
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # a process that sees no GPU: gloo, fp32 by default

# Under pytest-xdist (launch/test.sh runs 2 workers), each worker and every process it starts
# gets its share of the cores as threads: torch's default of one thread per core in each of
# them oversubscribed a 2-core machine (152 s -> 102 s for four of the suite's files, measured).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, available_cores() // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # the processes it starts
    torch.set_num_threads(_threads)  # this one (its pool starts at the first op)


def have(module: str) -> bool:
    """Whether an optional package is installed (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAVE_DALI, HAVE_WEBDATASET, HAVE_WANDB = have("nvidia.dali"), have("webdataset"), have("wandb")
HAVE_LOADER = HAVE_DALI or HAVE_WEBDATASET
needs_loader = pytest.mark.skipif(not HAVE_LOADER, reason="no data loader: neither NVIDIA DALI nor webdataset is installed")
NO_DALI = "NVIDIA DALI is not installed"
# a DALI test: skipped without DALI, and marked `dali` by that skip (pytest_collection_modifyitems),
# so `pytest -m dali` selects every one of them, the GPU ones included
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason=NO_DALI)
needs_webdataset = pytest.mark.skipif(not HAVE_WEBDATASET, reason="webdataset is not installed")
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")


# how a skipped SLURM test says to bring a cluster up (tests/test_slurm.py), and what the
# run's summary counts to say so in one line
SLURM_UP = "sudo bash launch/slurm_local.sh up"


def pytest_terminal_summary(terminalreporter):
    """One visible line when the SLURM tests skipped for want of a cluster (-q hides skip reasons)."""
    reasons = [r.longrepr[2] for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and SLURM_UP in r.longrepr[2]]
    if reasons:
        reason = reasons[0].removeprefix("Skipped: ")
        terminalreporter.write_line(f"SLURM: {len(reasons)} test{'s' * (len(reasons) > 1)} skipped: {reason}")


def pytest_collection_modifyitems(items):
    """Every test that skips without DALI is a DALI test: it carries the `dali` marker."""
    for item in items:
        if any(m.kwargs.get("reason") == NO_DALI for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.dali)


def with_loader(*kinds: str) -> list:
    """Parameters data.loader=KIND, each skipped where its package is absent."""
    marks = {"dali": needs_dali, "webdataset": needs_webdataset}
    return [pytest.param(k, marks=marks[k]) for k in kinds]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    from vae_dist.data.sample import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("data") / "tiny-sample", train_per_class=20,
                               val_per_class=6, test_count=5, seed=1)


@pytest.fixture(scope="session")
def shards(sample_root, tmp_path_factory) -> Path:
    """200 train / 60 val samples in shards of 64."""
    from vae_dist.data.pack import PackOptions, pack

    out = tmp_path_factory.mktemp("shards")
    pack(sample_root, out, PackOptions(shard_size=64, workers=2))
    return out


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs mounted at `path` for the block (`size=1m`: a small disk to fill; `ro,...`: a
    read-only folder, which stops root too, unlike permission bits), unmounted after. The test
    skips, saying why, where it cannot be mounted."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real small or read-only filesystem is a tmpfs mount, which needs root (CI runs as root)")
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here: {r.stderr.strip()[:100]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def match_checksum(ckpt: Path, name: str) -> None:
    """A checkpoint's checksums.json made to match its edited file `name`, so that the checksum
    check passes it and only what is inside the file tells."""
    import json

    from vae_dist.checkpoint import CHECKSUMS
    from vae_dist.files import sha256_file

    record = json.loads((ckpt / CHECKSUMS).read_text())
    record["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
    (ckpt / CHECKSUMS).write_text(json.dumps(record))


def run_cli(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`vae-dist ...` run in this process (tests/in_process.py): its exit code, stdout and stderr
    as a user's process gives them, without the interpreter start (`timeout` bounds a real process
    only). On a GPU machine every call is a real process, as before: a run there sets process-wide
    CUDA state (TF32, cuDNN autotuning, a CUDA context, DALI's teardown) that must not leak into
    the next test, and GPUs hidden by CUDA_VISIBLE_DEVICES= stay visible once CUDA is up."""
    env = {"WANDB_SILENT": "true", **(env or {})}
    if CUDA:
        return run_process(*args, cwd=cwd, env=env, timeout=timeout)
    from .in_process import run_in_process

    return run_in_process(list(args), env, cwd=cwd)


def run_process(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`python -m vae_dist ...`: a real process, where the process is the point (its exit as the
    shell sees it, what only a fresh interpreter shows)."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vae_dist", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def launch_command(nproc: int, *target: str, launcher: str = "accelerate.commands.launch") -> list[str]:
    """`accelerate launch --multi_gpu ... -m vae_dist` (or `target`, e.g. a script) on the CPU with
    gloo, also on a GPU machine (`env` execs it, so a signal sent to the process reaches accelerate itself).
    `launcher="vae_dist.launcher"`: as the launch scripts run it."""
    return ["env", "CUDA_VISIBLE_DEVICES=", sys.executable, "-m", launcher, "--multi_gpu",
            "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *(target or ("-m", "vae_dist"))]


def accelerate_launch(nproc: int, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    """A real `accelerate launch` with nproc processes, run to the end."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(launch_command(nproc) + list(args), capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def library_warnings(stderr: str) -> list[str]:
    """The Python warnings in a run's stderr (`file:line: FutureWarning: ...`): a user can act on
    none of them, so a run prints none."""
    import re

    return [line for line in stderr.splitlines() if re.search(r"\b\w*Warning: ", line)]


# -- servers on the loopback for shards at a URL (tests/servers.py) --------------------------


@pytest.fixture
def http_server(tmp_path_factory):
    """A FaultyHTTPServer serving `http_server.root` (a new empty folder, not in tmp_path) at
    `http_server.url`; fault controls: fail_next(n), cut_next(name), throttle(bytes_per_s), stop()/start()."""
    from .servers import FaultyHTTPServer

    server = FaultyHTTPServer(tmp_path_factory.mktemp("served"))
    yield server
    server.stop()


def _moto(check_credentials: bool):
    if not have("moto"):
        pytest.skip("moto is not installed (pip install 'vae-dist[dev]')")
    from .servers import MotoServer

    return MotoServer(check_credentials=check_credentials)


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 API server on the loopback, started once per session (~1 s)."""
    server = _moto(check_credentials=False)
    yield server
    server.close()


@pytest.fixture(scope="session")
def moto_checking_credentials():
    """A second moto server that refuses keys it does not know (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    server = _moto(check_credentials=True)
    yield server
    server.close()


def aws_env(monkeypatch, endpoint: str) -> dict:
    """The standard AWS variables of a test pointed at `endpoint` (boto3 reads them itself), the
    user's own (~/.aws, AWS_PROFILE) kept out; processes the test starts inherit them."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret-do-not-print",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A new, empty bucket on `moto_server` with the test's AWS variables set: `s3.url(prefix)`
    is its s3:// folder URL, `s3.put(key, data)` and `s3.put_folder(folder, prefix)` fill it,
    `s3.client` is a boto3 client of it."""
    import uuid

    from .servers import S3Bucket

    aws_env(monkeypatch, moto_server.endpoint)
    return S3Bucket(f"vae-dist-{uuid.uuid4().hex[:12]}")
