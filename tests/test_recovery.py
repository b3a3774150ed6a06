"""Faults, round three: a full disk, a damaged sample, a killed run resumed, a finished run
started again, a launch script without its tools. Each ends in one line that says what
happened and what to do, and leaves what was written as it was."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vae_dist.checkpoint import list_checkpoints, verify_checkpoint

from .conftest import (
    CPU_ONLY,
    HAVE_WANDB,
    ROOT,
    accelerate_launch,
    needs_dali,
    needs_loader,
    needs_webdataset,
    run_cli,
    tmpfs,
)
from .test_faults import COMMON, _one_line, _steps_logged, _train, _wait_for_rows

pytestmark = needs_loader


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- a full disk -------------------------------------------------------------------------

def _launcher_exits(stderr: str) -> dict[int, int]:
    """Rank -> exit code, from the launcher's ChildFailedError report."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank.*?exitcode\s*: (-?\d+)", stderr, re.S)
    return {int(rank): int(code) for rank, code in found}


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_older_ones_stay(shards, tmp_path):
    with tmpfs(tmp_path / "small", "size=8m") as small:
        run = small / "run"
        assert _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=4").returncode == 0
        before = _rows(run)
        filler = small / "filler"  # the disk fills up: a few KiB stay free, a checkpoint needs more
        free = shutil.disk_usage(small).free
        filler.write_bytes(bytes(free - 48 * 1024))

        # two processes: rank 0's failed write ends rank 1 too (no wait at a barrier), one line
        r = accelerate_launch(2, "train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON,
                              "--train.checkpoint_every=4", "--train.max_steps=8", "--train.keep_last=1")
        errors = [line for line in r.stderr.splitlines() if line.startswith("vae-dist: error:")]
        # no traceback, and both ranks end at once: both agreed the error and exit 2, except
        # that the launcher stops the other workers (SIGTERM) as soon as it sees one fail, so
        # the slower of the two to leave may be reported as stopped instead. Dying of SIGTERM
        # still shows it had left the Trainer: in the loop, StopSignal would catch the signal
        # and the launcher, after its grace period, would report SIGKILL.
        assert r.returncode != 0 and str(ROOT / "vae_dist") not in r.stderr, r.stderr[-3000:]
        exits = _launcher_exits(r.stderr)
        assert sorted(exits) == [0, 1] and set(exits.values()) <= {2, -signal.SIGTERM} and 2 in exits.values(), exits
        assert len(errors) == 1, r.stderr[-3000:]
        assert errors[0].startswith(f"vae-dist: error: cannot write checkpoint step_0000008 in {run / 'checkpoints'}: "
                                    "No space left on device; "), errors[0]
        assert "KiB free, a checkpoint needs " in errors[0]
        assert "the newest complete checkpoint is step_0000004, which train.resume=auto continues from" in errors[0]
        assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial folder is gone at once
        assert [p.name for p in list_checkpoints(run)] == ["step_0000004"]  # keep_last=1 pruned nothing
        assert verify_checkpoint(run / "checkpoints" / "step_0000004") is None
        assert _rows(run)[:len(before)] == before

        # space again: a crash's leftover .tmp-* goes at the next start, which continues from step 4
        filler.unlink()
        (run / "checkpoints" / ".tmp-step_0000099").mkdir()
        (run / "checkpoints" / ".tmp-step_0000099" / "model.safetensors").write_bytes(b"half")
        r = _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=8")
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"removed {run / 'checkpoints' / '.tmp-step_0000099'}, a checkpoint left half-written" in r.stdout
        assert "at step 4 (epoch" in r.stdout and not list((run / "checkpoints").glob(".tmp-*"))
        assert [p.name for p in list_checkpoints(run)][-1] == "step_0000008"


# -- a damaged sample --------------------------------------------------------------------

def _damage_a_jpeg(shards: Path, out: Path, split: str) -> tuple[Path, str]:
    """A copy of the shards with one JPEG's header overwritten in place (bit rot, a bad copy):
    the tar keeps its size, so only its sha256 tells. Returns (its tar, the sample key)."""
    shutil.copytree(shards, out)
    shard = sorted(out.glob(f"{split}-*.tar"))[-1]
    line = shard.with_suffix(".idx").read_text().splitlines()[3]  # the third sample
    ext, offset, size, name = line.split()[:4]
    assert ext == "jpg"
    with open(shard, "r+b") as f:
        f.seek(int(offset) + 2)
        f.write(bytes(range(200)))
    return shard, name.rpartition(".")[0]


@pytest.mark.parametrize("loader, split", [pytest.param("dali", "train", marks=needs_dali),
                                           pytest.param("webdataset", "val", marks=needs_webdataset)])
def test_a_sample_that_does_not_decode_is_named_in_one_line(shards, tmp_path, loader, split):
    """DALI (train) and webdataset (val, at the first epoch's end): the split, the shard and the
    key, found on the host after the failure; and `vae-dist verify` finds it too."""
    bad, key = _damage_a_jpeg(shards, tmp_path / "bad", split)
    r = _train(tmp_path / "bad", tmp_path / "run", f"--data.loader={loader}", "--train.max_steps=30")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith(f"vae-dist: error: {split} sample {key} in {bad} does not decode ("), last
    assert last.endswith(f"the shard is damaged; `vae-dist verify {bad.parent}` checks every shard, and packing "
                         f"again replaces it"), last
    r = run_cli("verify", str(bad.parent))
    assert r.returncode == 2 and f"{bad.name}: sha256 mismatch" in r.stdout


def test_a_truncated_shard_is_refused_before_step_1_and_data_verify_finds_a_damaged_one(shards, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(shards, cut)
    tar = cut / "train-000001.tar"
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[:size // 2])
    r = _train(cut, tmp_path / "run")
    _one_line(r, f"corrupt shard {tar}: {size // 2} bytes, manifest says {size}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a step was taken

    bad, _ = _damage_a_jpeg(shards, tmp_path / "bad", "train")  # same size: only the sha256 tells
    r = _train(tmp_path / "bad", tmp_path / "run2", "--data.verify=true")
    _one_line(r, f"data.verify: 1 problem with the shards in {bad.parent}, the first: {bad.name}: sha256 mismatch")
    assert not (tmp_path / "run2").exists()  # checked before the run folder is made
    r = _train(shards, tmp_path / "run3", "--data.verify=yes", "--train.max_steps=1")
    assert r.returncode == 0 and f"data.verify: all 5 shards in {shards} match manifest.json (" in r.stdout


# -- a killed run resumed; a finished run started again ------------------------------------

def _kill_between_checkpoints(proc, run: Path, min_steps: int, timeout=180) -> None:
    """SIGKILL once `min_steps` rows are logged and the newest step is past the newest checkpoint.
    The run is frozen (SIGSTOP) while that is read, so it cannot reach the next checkpoint
    between the look and the kill; when it sits on one, it goes on (SIGCONT) and is looked at again."""
    _wait_for_rows(run, proc, rows=min_steps, timeout=timeout)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        proc.send_signal(signal.SIGSTOP)
        done = list_checkpoints(run)
        if done and _steps_logged(run)[-1] > int(done[-1].name.split("_")[1]):
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    proc.kill()  # frozen or not: SIGKILL runs no handler
    proc.wait()


@pytest.mark.slow
def test_a_killed_run_resumed_reads_as_one_run(shards, tmp_path):
    """SIGKILL after the last checkpoint: the resumed run moves the rows past it aside, so
    metrics.jsonl (and the loss curves drawn from it) go forward only; in W&B (offline, read
    back) the replayed rows carry resumes=1."""
    run = tmp_path / "run"
    wandb = ["--log.wandb_mode=offline"] if HAVE_WANDB else []
    cmd = [sys.executable, "-m", "vae_dist", "train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON,
           *wandb, "--train.checkpoint_every=4", "--train.max_steps=100000", "--log.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CPU_ONLY, "WANDB_SILENT": "true"})
    _kill_between_checkpoints(proc, run, min_steps=7)  # no handler, no checkpoint: the rows past it are orphans
    killed = _steps_logged(run)
    ckpt_step = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert killed[-1] > ckpt_step, proc.stderr.read()[-2000:]

    r = _train(shards, run, *wandb, "--train.checkpoint_every=4", f"--train.max_steps={killed[-1] + 3}",
               "--log.log_every=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _steps_logged(run) == list(range(1, killed[-1] + 4))  # strictly increasing, no step twice
    (aside,) = (run / "abandoned").iterdir()
    assert aside.name.startswith(f"after-step_{ckpt_step:07d}-")
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()
            if "split" not in x] == [s for s in killed if s > ckpt_step]  # the replaced rows, kept
    if HAVE_WANDB:
        from .wandb_reader import history_rows

        second = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))[-1]  # the resumed start's
        replayed = [row["step"] for row in history_rows(second) if "train/loss" in row]
        assert replayed[0] == ckpt_step + 1 and {row["resumes"] for row in history_rows(second)} == {1}


def test_a_finished_run_started_again_writes_nothing_and_its_epoch_end_is_evaluated_once(shards, tmp_path):
    """The same command after the last step: one line, exit 0, not a file touched. The epoch's
    end (12 steps here) is evaluated before it is checkpointed, so a run resumed there (to
    train further) neither evaluates it again nor skips it."""
    run = tmp_path / "run"
    args = ["--train.checkpoint_every=12", "--train.max_steps=12"]
    assert _train(shards, run, *args).returncode == 0
    state = json.loads((run / "checkpoints" / "step_0000012" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"], state["last_eval_step"]) == (1, 0, 12)
    before = _snapshot(run)
    r = _train(shards, run, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines() == [
        f"the run in {run} already reached its last step (12 of 12) and wrote its weights: nothing to do (a larger "
        f"train.max_steps or train.epochs trains on from step_0000012; train.overwrite=true starts over)"]
    assert _snapshot(run) == before
    assert [(row["step"], row["epoch"]) for row in _rows(run) if row.get("split") == "val"] == [(12, 1)]
    assert _train(shards, run, "--train.checkpoint_every=12", "--train.max_steps=24").returncode == 0
    assert [row["step"] for row in _rows(run) if row.get("split") == "val"] == [12, 24]


def test_a_checkpoint_of_another_architecture_is_one_line_with_the_choices_and_nothing_moves(shards, tmp_path):
    """Resuming with other model.* values: refused before anything in the folder moves (an older
    checkpoint given as train.resume=PATH would have set the newer ones aside), naming the keys
    that differ and what to do; train.overwrite=true, one of the choices, then starts over."""
    run = tmp_path / "run"
    assert _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=8").returncode == 0
    before = _snapshot(run)
    other = ["--model.latent_dim=16", "--train.max_steps=12"]
    line = _one_line(_train(shards, run, *other), f"checkpoint {run / 'checkpoints' / 'step_0000008'} holds another "
                     "architecture: model.latent_dim=8 (this run: 16)", "train.overwrite=true", "another train.out_dir")
    assert "to continue it, train with its model.* values" in line
    older = run / "checkpoints" / "step_0000004"
    _one_line(_train(shards, run, *other, f"--train.resume={older}"), f"checkpoint {older} holds another architecture",
              "another train.out_dir")
    assert _snapshot(run) == before and not (run / "abandoned").exists()
    r = _train(shards, run, *other, "--train.overwrite=true")
    assert r.returncode == 0, r.stderr[-2000:]
    (old,) = tmp_path.glob("run.old-*")
    assert _snapshot(old) == before  # the old run, moved whole


# -- launch scripts and tools ------------------------------------------------------------

def test_single_node_script_without_nvidia_smi_is_one_line(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with bash's tools but no nvidia-smi
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "sha256sum", "cut", "grep"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if k != "NUM_GPUS"}
    env.update(PATH=str(bin_dir), PYTHON=sys.executable)
    for extra, words in (({}, "no GPU found: nvidia-smi is not installed"),
                         ({"NUM_GPUS": "0"}, "no GPU found"), ({"NUM_GPUS": "two"}, "NUM_GPUS must be a whole number"),
                         ({"NUM_GPUS": "1", "MIXED_PRECISION": "fp8"}, "MIXED_PRECISION must be one of no, bf16, fp16")):
        r = subprocess.run([shutil.which("bash"), str(ROOT / "launch" / "train_single_node.sh")],
                           env={**env, **extra}, capture_output=True, text=True, cwd=tmp_path)
        _one_line(r, "vae-dist: error: ", words)
    r = subprocess.run(["bash", str(ROOT / "launch" / "train_slurm.sh")], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    _one_line(r, "vae-dist: error: train_slurm.sh runs under SLURM: submit it with sbatch")
