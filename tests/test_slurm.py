"""Multi-node for real: the SLURM script on a two-node cluster on this host (the project's
`launch/slurm_local.sh up`, as root), and a plain two-"node" `accelerate launch` on localhost.
Without a cluster the SLURM tests skip, and the run's summary says so in one line (conftest.py)."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vae_dist.checkpoint import latest_checkpoint

from .conftest import CPU_ONLY, HAVE_WANDB, ROOT, SLURM_UP, TINY_MODEL, _free_port, library_warnings, needs_loader

ARGS = [*TINY_MODEL, "--train.batch_size=16", "--data.num_threads=1", "--log.wandb_mode=disabled",
        "--log.log_every=5", "--train.eval_every=0", "--train.checkpoint_every=0"]


def _cluster_up() -> str | None:
    """None where a cluster answers; else why not, and how to bring one up (the skip reason)."""
    if shutil.which("sbatch") is None:
        return f"no SLURM cluster (no sbatch on the PATH): bring one up with {SLURM_UP}"
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if r.returncode != 0 or "idle" not in r.stdout and "mix" not in r.stdout:
        return f"no SLURM cluster (SLURM is installed but no node is up: " \
               f"{(r.stderr or r.stdout).strip()[:80] or 'sinfo lists none'}): bring one up with {SLURM_UP}"
    return None


needs_slurm = pytest.mark.skipif(_cluster_up() is not None, reason=str(_cluster_up()))
pytestmark = [needs_loader, pytest.mark.slow]  # real processes and a cluster, all of it


def _submit_env() -> dict:
    """The environment sbatch hands the job, without the suite's OMP_NUM_THREADS (conftest.py): the
    script sets its own from the job's CPUs, and that is what is tested."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return {**env, "GPUS_PER_NODE": "1", "PYTHON": sys.executable, "WANDB_SILENT": "true", **CPU_ONLY}


def _sbatch(shards, out: Path, *extra, env=None) -> str:
    env = {**_submit_env(), **(env or {})}
    r = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                        f"--output={out}/slurm-%j.out", "launch/train_slurm.sh", f"--data.shards={shards}",
                        f"--train.out_dir={out / 'run'}", *ARGS, *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip().split(";")[0]


def _job(job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(job: str, timeout=300, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(job)
        if info.get("JobState") in until:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not end: {_job(job)}")


def _steps(run: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "split" not in line]


@needs_slurm
def test_two_node_job_trains_to_max_steps(shards, tmp_path):
    job = _sbatch(shards, tmp_path, "--train.max_steps=20", env={"MIXED_PRECISION": "no"})  # a word YAML 1.1 reads as false
    info = _wait(job)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out[-3000:]
    assert library_warnings(out) == [], out[-3000:]  # OMP_NUM_THREADS set by the script: no accelerate warning
    assert "processes=2" in out and "2 nodes x 1 process" in out and "mixed_precision=no" in out
    assert "precision: 'no'" in (tmp_path / "run" / "config.yaml").read_text()
    assert _steps(tmp_path / "run")[-1] == 20
    ckpt = latest_checkpoint(tmp_path / "run")
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


@needs_slurm
def test_signalled_job_requeues_once_resumes_and_completes(shards, tmp_path):
    """With train.overwrite=true over an older run: the first start moves that run aside, the
    requeued start continues this job's own run (it does not move it aside and restart)."""
    old_run = tmp_path / "run"
    old_run.mkdir()
    (old_run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    job = _sbatch(shards, tmp_path, "--train.max_steps=100", "--train.overwrite=true",
                  *(["--log.wandb_mode=offline"] if HAVE_WANDB else []))
    out_file = tmp_path / f"slurm-{job}.out"
    deadline = time.time() + 180
    while time.time() < deadline and not (out_file.is_file() and "step      20" in out_file.read_text()):
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # what --signal=TERM@120 sends
    requeued = _wait(job, until=("PENDING",))
    assert requeued["Restarts"] == "1"
    # SLURM holds a requeued job for CredExpire (2 min); an admin's nudge saves the suite that wait.
    # Not at once: a start within the second of the requeue meets the old job's revoked credential.
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    info = _wait(job, timeout=400)
    out = out_file.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-3000:]
    assert "Traceback" not in out and "wandb failed" not in out, out[-3000:]
    assert "requeueing job" in out and "start 2 on" in out
    stopped = int(re.search(r"stopped by signal 15 at step (\d+)", out).group(1))
    assert stopped >= 20 and f"at step {stopped} (epoch" in out  # resumed from there, not from 0
    assert out.count("stopped by signal") == 1 and out.count("resumed from") == 1, out[-3000:]  # rank 0's lines once
    steps = _steps(tmp_path / "run")
    assert steps[-1] == 100 and steps.count(5) == 1  # one start from 0, then a continuation
    assert f"SLURM job {job} was requeued: it continues its own run" in out
    (aside,) = tmp_path.glob("run.old-*")  # moved aside once, by the first start
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    if HAVE_WANDB:  # the first start's W&B run (offline, read back) recorded every row to its stop
        from .wandb_reader import exit_code, history_rows, preempting

        first, second = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
        logged = [r["step"] for r in history_rows(first) if "train/loss" in r]
        assert logged == list(range(5, stopped + 1, 5)), logged
        assert preempting(first) and exit_code(first) == 143
        assert {r["resumes"] for r in history_rows(second)} == {1} and exit_code(second) == 0


@needs_slurm
def test_job_without_training_arguments_trains_with_the_defaults(tmp_path):
    """No arguments after the script: `vae-dist train` with its defaults, run in the submit
    folder (here without a `shards` folder, so its one-line error, not an empty argument's)."""
    env = _submit_env()
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
                        f"--output={tmp_path}/slurm-%j.out", str(ROOT / "launch" / "train_slurm.sh")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    job = r.stdout.strip().split(";")[0]
    info = _wait(job)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED", out[-3000:]
    assert "vae-dist: error: shard folder not found: shards" in out and "unexpected argument" not in out, out[-3000:]


def test_plain_two_node_accelerate_launch_on_localhost(shards, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank R --main_process_ip HOST` on each node."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--rdzv_backend", "static", "--same_network",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vae_dist", "train",
               f"--data.shards={shards}", f"--train.out_dir={tmp_path / 'run'}", *ARGS, "--train.max_steps=10"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "WANDB_SILENT": "true", **CPU_ONLY}))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "processes=2" in outs[0][0]
    assert _steps(tmp_path / "run")[-1] == 10


def test_a_missing_cluster_is_one_line_in_the_summary(tmp_path):
    """issue 44, item 5: the SLURM tests run on a PATH without sbatch skip, naming the project's
    own script (not a path outside the clone), and the run's summary says so in one line."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                        "tests/test_slurm.py", "-k",
                        "not accelerate_launch and not one_line_in_the_summary and not leaves_a_slurm_conf"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PATH": str(tmp_path)})  # a folder with no sbatch in it
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # issue 44 review, Low: the count is this module's, not a number written here: every test
    # that needs the cluster, and as many as the run skipped
    needing = [f for name, f in globals().items() if name.startswith("test_") and callable(f)
               and needs_slurm.mark in getattr(f, "pytestmark", [])]
    assert len(needing) >= 3 and f"{len(needing)} skipped" in r.stdout.splitlines()[-1], r.stdout[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("SLURM:")]
    assert lines == [f"SLURM: {len(needing)} tests skipped: no SLURM cluster (no sbatch on the PATH): "
                     "bring one up with sudo bash launch/slurm_local.sh up"], r.stdout[-3000:]
    assert (ROOT / "launch" / "slurm_local.sh").is_file() and "shared" not in r.stdout


@pytest.mark.parametrize("command", ["up", "down"])
def test_slurm_local_leaves_a_slurm_conf_it_did_not_write_alone(tmp_path, command):
    """issue 44 review, finding 6: on a machine with its own SLURM install, up would overwrite its
    slurm.conf and down stop its daemons and cancel its jobs: both refuse in one line, before
    anything (SLURM_CONF, which SLURM's own daemons and commands read, names the file here)."""
    conf = tmp_path / "slurm.conf"
    text = "ClusterName=prod\nSlurmctldHost=head\nStateSaveLocation=/var/spool/slurmctld\n"
    conf.write_text(text)
    r = subprocess.run(["bash", "launch/slurm_local.sh", command], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "SLURM_CONF": str(conf)})
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr == (f"slurm_local.sh: {conf} exists and was not written by this script (a real SLURM "
                        "install?): not touching it or its daemons\n")
    assert conf.read_text() == text
