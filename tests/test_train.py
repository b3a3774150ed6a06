"""Real training: one process and `accelerate launch` with 2 processes (gloo on CPU)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vae_dist.checkpoint import latest_checkpoint, load_weights
from vae_dist.model import VAE, VAEConfig

from .conftest import (
    CPU_ONLY,
    CUDA,
    HAVE_WANDB,
    TINY_MODEL,
    accelerate_launch,
    launch_command,
    library_warnings,
    needs_loader,
    run_cli,
)
from .test_faults import _children, _rank_of, _wait_for_rows
from .test_hooks import check_pictures_and_wandb

pytestmark = needs_loader

COMMON = [*TINY_MODEL, "--train.batch_size=16", "--data.num_threads=1", "--log.wandb_mode=disabled",
          "--log.log_every=2", "--log.image_every=1000"]


def _rows(run: Path, split=None):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


@pytest.mark.slow
def test_two_process_ddp_logs_once_checkpoints_and_resumes(shards, tmp_path):
    """Two ranks, one run: rank 0 alone writes the rows, the pictures and the one W&B run
    (offline, read back: scalars and pictures); both ranks checkpoint; a resume continues."""
    run = tmp_path / "run"
    args = ["train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON, "--optim.lr=3e-3",
            "--train.checkpoint_every=12", "--train.eval_every=12", "--log.image_every=12",
            *(["--log.wandb_mode=offline"] if HAVE_WANDB else [])]  # the last value counts
    r = accelerate_launch(2, *args, "--train.max_steps=24", env={"WANDB_API_KEY": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("training: processes=2") == 1  # rank 0's lines once
    assert library_warnings(r.stderr) == [], r.stderr  # e.g. DDP's broadcast_buffers FutureWarning, once a rank
    check_pictures_and_wandb(run, steps=(12, 24))
    rows = _rows(run)
    assert [row["step"] for row in rows] == list(range(2, 25, 2))  # rank 0 alone writes: no duplicate rows
    assert sum(x["loss"] for x in rows[-3:]) < sum(x["loss"] for x in rows[:3])  # loss goes down
    assert all(x["img_per_s"] > 0 and 0 <= x["data_wait"] <= 1 for x in rows)
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_0000024"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()  # both ranks took part
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 24
    assert len(_rows(run, "val")) >= 2 and all(v["images"] == 60 for v in _rows(run, "val"))  # each val sample once

    r = accelerate_launch(2, *args, "--train.max_steps=36", "--train.resume=auto", "--log.wandb_mode=disabled",
                          "--log.image_every=1000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("resumed from") == 1 and "at step 24" in r.stdout
    assert library_warnings(r.stderr) == [], r.stderr
    new = [row["step"] for row in _rows(run)][len(rows):]
    assert new == list(range(26, 37, 2))  # continued from 24, not from 0, and stopped at max_steps
    assert latest_checkpoint(run).name == "step_0000036"
    model = load_weights(run / "model.safetensors")  # usable without the trainer
    assert model.cfg.latent_dim == 8


@pytest.mark.slow
def test_one_process_2b_equals_two_processes_b(shards, tmp_path):
    """DDP averages gradients: 2 x batch 8 on two ranks is one step of batch 16 on one rank.
    The cached loader hands rank r the images perm[r::2], so both runs see the same 16 images."""
    base = ["train", f"--data.shards={shards}", *TINY_MODEL, "--data.cache=ram", "--data.flip=false",
            "--log.wandb_mode=disabled", "--train.max_steps=1", "--log.log_every=1", "--train.eval_every=0",
            "--loss.kl_schedule=constant", "--log.image_every=1000",
            # a large eps makes Adam's first step proportional to the gradient (not its sign),
            # so the step compares the gradients themselves
            "--optim.eps=1e4", "--optim.lr=1.0",
            # both sides alike: fp32, eager, default layout, on the CPU (2 processes always are)
            "--train.precision=no", "--model.compile=false", "--model.channels_last=false"]
    one = run_cli(*base, f"--train.out_dir={tmp_path / 'one'}", "--train.batch_size=16", env=CPU_ONLY)
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *base, f"--train.out_dir={tmp_path / 'two'}", "--train.global_batch_size=16")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    (a,), (b,) = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    # same starting weights and images; only the reparameterization noise differs per rank
    assert b["loss"] == pytest.approx(a["loss"], rel=5e-3)
    wa = load_file(str(tmp_path / "one" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model.safetensors"))
    torch.manual_seed(0)  # the trainer's init for train.seed=0
    w0 = VAE(VAEConfig(widths=(8, 16, 16, 32), latent_dim=8)).state_dict()
    assert set(wa) == set(wb) == set(w0)
    da = torch.cat([(wa[k] - w0[k]).flatten() for k in w0])
    db = torch.cat([(wb[k] - w0[k]).flatten() for k in w0])
    assert da.norm() > 1e-4  # the step did move the weights
    # the two updates agree up to the difference in reparameterization noise
    print("relative update difference", float((da - db).norm() / da.norm()))
    assert (da - db).norm() / da.norm() < 0.03


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(shards, tmp_path):
    """SIGTERM (preemption) to `python -m vae_dist`: it checkpoints at the next sync point,
    exits 143, and a resume continues from there to its last step."""
    run = tmp_path / "run"
    args = ["train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON,
            "--train.checkpoint_every=0", "--train.eval_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "vae_dist", *args, "--train.max_steps=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(run, proc, rows=3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "stopped by signal 15" in out, err[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = _stopped_step(run, nproc=1)
    r = run_cli(*args, f"--train.max_steps={step + 4}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {step}" in r.stdout
    assert latest_checkpoint(run).name == f"step_{step + 4:07d}"


@pytest.mark.slow
def test_sigterm_to_the_launcher_or_to_one_rank_stops_both_ranks_at_one_step(shards, tmp_path):
    """Under `accelerate launch`, two ways a signal comes: to the launcher, which forwards it to
    both ranks, and to rank 1 alone (at any moment; epochs of 6 steps end in an evaluation).
    Either way the ranks agree at the next sync point, both checkpoint that step, nothing hangs,
    and the next launch resumes from it."""
    run = tmp_path / "run"
    args = ["train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON,
            "--train.checkpoint_every=0", "--train.max_steps=100000"]
    launcher = subprocess.Popen(launch_command(2, launcher="vae_dist.launcher") + args, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    _wait_for_rows(run, launcher, rows=3)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert "stopped by signal 15" in out, err[-3000:]
    # issue 44 review, finding 8: the launch scripts' launcher ends in one line and the signal's code
    assert launcher.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert "vae-dist: launch stopped by signal 15 (SIGTERM), passed on to every rank" in err.splitlines(), err[-3000:]
    first = _stopped_step(run, nproc=2)

    resumed = subprocess.Popen(launch_command(2) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(run, resumed, rows=len((run / "metrics.jsonl").read_text().splitlines()) + 2)
    workers = {_rank_of(p): p for p in _children(resumed.pid)}
    assert set(workers) >= {0, 1}, workers
    os.kill(workers[1], signal.SIGTERM)
    out, err = resumed.communicate(timeout=180)
    assert f"at step {first}" in out and "stopped by signal 15" in out, err[-3000:]
    assert _stopped_step(run, nproc=2) > first


# issue 43, case 5: a stopped rank is named within train.collective_timeout_s, not torch's 30 minutes
@pytest.mark.slow
def test_a_stopped_rank_is_named_within_the_collective_timeout_and_the_run_resumes(shards, tmp_path):
    run, timeout = tmp_path / "run", 4
    args = ["train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON, "--train.checkpoint_every=4",
            "--train.max_steps=100000", f"--train.collective_timeout_s={timeout}"]
    launcher = subprocess.Popen(launch_command(2) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(run, launcher, rows=5)  # past the checkpoint of step 8
    time.sleep(1.5)  # a heartbeat or two (one a second): rank 1's step is heard
    workers = {_rank_of(p): p for p in _children(launcher.pid)}
    os.kill(workers[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while Path(f"/proc/{workers[0]}").exists() and time.monotonic() - stopped_at < 120:
            time.sleep(0.1)
        detected = time.monotonic() - stopped_at
    finally:
        os.kill(workers[1], signal.SIGKILL)  # a stopped process keeps a SIGTERM pending: the launcher's would wait
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    (line,) = [x for x in err.splitlines() if x.startswith("vae-dist: error:")]
    newest = latest_checkpoint(run)
    assert f"rank 1 (pid {workers[1]} on {socket.gethostname()}, last heard at step " in line, line + err[-3000:]
    assert int(line.split("last heard at step ")[1].split(")")[0]) > 8, line
    assert "stopped answering" in line and f"(train.collective_timeout_s={timeout}): the run stops; the newest " \
        f"checkpoint {newest.name} is intact: train.resume=auto continues from it" in line, line
    assert "Traceback" not in err.split("vae-dist: error:")[0], err[-3000:]  # nothing from the ranks before it
    assert timeout <= detected < timeout + 15, detected
    assert not (run / ".lock").exists()  # rank 0 let go of the folder before it exited
    print(f"detected a stopped rank {detected:.1f} s after SIGSTOP (train.collective_timeout_s={timeout})")

    step = json.loads((newest / "trainer_state.json").read_text())["step"]
    r = run_cli("train", *args[1:3], *COMMON, f"--train.max_steps={step + 2}")  # one process goes on
    assert r.returncode == 0 and f"resumed from {newest}" in r.stdout, r.stderr[-2000:]


def _stopped_step(run: Path, nproc: int) -> int:
    """The step of the checkpoint a stop wrote: every rank's RNG in it, at a sync point."""
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, "no checkpoint after SIGTERM"
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == [f"rng_rank{r}.pt" for r in range(nproc)]
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert step >= 6, step
    assert nproc == 1 or step % 2 == 0, step  # ranks agree at a sync point (log.log_every=2)
    return step


def test_short_epochs_are_warned_about_and_epoch_end_evaluation_turns_off(shards, tmp_path):
    # issue 44, item 7: 200 images in batches of 64 are 3 steps an epoch, fewer than log.log_every:
    # the line under the start line says so and what to set; train.eval_at_epoch_end=false leaves
    # the evaluations asked for (here none by steps: the last step's only)
    args = ["train", f"--data.shards={shards}", *COMMON, "--train.batch_size=64", "--train.max_steps=9",
            "--log.log_every=50", "--train.eval_every=0", "--train.checkpoint_every=0"]
    warning = ("vae-dist: warning: an epoch is 3 steps, fewer than log.log_every=50: most epochs write no train row "
               "(log.log_every=3 writes one an epoch)")
    r = run_cli(*args, f"--train.out_dir={tmp_path / 'each'}")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("training: ") and "steps_per_epoch=3" in lines[0], lines[:2]
    assert lines[1] == warning + ("; each of the 3 epoch ends is evaluated (train.eval_at_epoch_end=false leaves "
                                  "train.eval_every and the last step)"), lines[:2]
    assert [r["step"] for r in _rows(tmp_path / "each", "val")] == [3, 6, 9]
    r = run_cli(*args, "--train.eval_at_epoch_end=false", f"--train.out_dir={tmp_path / 'off'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[1] == warning
    assert [r["step"] for r in _rows(tmp_path / "off", "val")] == [9]  # the last step's evaluation only
    assert [r["step"] for r in _rows(tmp_path / "off")] == [9]  # the one train row: the last step


def test_nonfinite_loss_stops_with_a_clear_message(shards, tmp_path):
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={tmp_path}", *COMMON,
                "--optim.lr=1e30", "--train.max_bad_steps=3", "--train.max_steps=200")
    assert r.returncode == 2
    assert "non-finite steps in a row" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]


@pytest.mark.parametrize("args, words", [
    (["--data.shards=/nonexistent"], "shard folder not found"),
    (["--train.resume=/nonexistent/ckpt"], "checkpoint not found"),
    pytest.param(["--data.cache=gpu"], "CUDA", marks=pytest.mark.skipif(CUDA, reason="a GPU is here")),
    pytest.param(["--data.decode=gpu"], "CUDA", marks=pytest.mark.skipif(CUDA, reason="a GPU is here")),
    (["--train.batch_size=1000"], "fewer than one batch"),
])
def test_user_errors_are_one_line(shards, tmp_path, args, words):
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={tmp_path}", *COMMON, "--train.max_steps=1",
                *args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr[-2000:]


@pytest.mark.slow
def test_eval_scores_the_same_images_with_one_sigma_whatever_the_launch(shards, tmp_path):
    """train.eval_images caps the global count (the same val images for 1 and 2 processes);
    the MSE decoder's sigma is one value agreed by the ranks: the root mean train recon per
    subpixel over the steps since the last evaluation, whatever log.log_every is."""
    base = ["train", f"--data.shards={shards}", *TINY_MODEL, "--data.cache=ram", "--log.wandb_mode=disabled",
            "--train.max_steps=3", "--train.eval_every=3", "--train.eval_images=24", "--log.image_every=1000",
            "--optim.lr=1e-30",  # the weights stay the initial ones: both launches score the same model
            "--train.precision=no", "--model.channels_last=false"]
    one = run_cli(*base, f"--train.out_dir={tmp_path / 'one'}", "--train.batch_size=16", "--log.log_every=1",
                  env=CPU_ONLY)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = {}
    for every in (1, 2):
        out = tmp_path / f"two-{every}"
        r = accelerate_launch(2, *base, f"--train.out_dir={out}", "--train.global_batch_size=16",
                              f"--log.log_every={every}")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[every] = out
    (a,), (b,), (c,) = (_rows(run, "val") for run in (tmp_path / "one", runs[1], runs[2]))
    assert a["images"] == b["images"] == c["images"] == 24
    assert b["psnr"] == pytest.approx(a["psnr"], rel=1e-6)  # decode(mu) of the same images by the same weights
    pixels = 3 * 64 * 64
    recon = [row["recon"] for row in _rows(runs[1])]  # one row per step, averaged over the ranks
    assert len(recon) == 3
    assert b["sigma"] == pytest.approx((sum(recon) / 3 / pixels) ** 0.5, rel=1e-6)
    assert c["sigma"] == pytest.approx(b["sigma"], rel=1e-6) and c["bpd"] == pytest.approx(b["bpd"], rel=1e-6)
    assert a["sigma"] == pytest.approx(b["sigma"], rel=0.02)  # the same images, other noise


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing shards", "batch too large"])
def test_a_refused_start_under_two_processes_is_one_line_and_writes_nothing(shards, tmp_path, case):
    """Rank 0 opens the shard folder and checks what the Trainer's setup would refuse
    (`refuse_early`), and hands every rank the result (or its error), before the run folder is
    claimed: one line for the run, and no run folder left behind (nor its parent, made for it).
    The other checks `refuse_early` makes for two processes: test_scale_out.py, in-process.
    Launched as the launch scripts do (vae_dist.launcher), with bf16 as accelerate_config.yaml
    asks, on this CPU: one warning saying so, and the launcher's one line, not its traceback."""
    run = tmp_path / "new" / "run"
    shard_dir, extra, error = {
        "missing shards": (tmp_path / "missing", [], f"shard folder not found: {tmp_path / 'missing'}"),
        # issue 44, item 4: the key the user set is the one named (200 train samples, 100 per process)
        "batch too large": (shards, ["--train.global_batch_size=256"],
                            "200 train samples over 2 processes give 100 per process, fewer than one batch of 128 "
                            "(train.global_batch_size=256 over 2 processes): lower train.global_batch_size"),
    }[case]
    cmd = launch_command(2, "--mixed_precision", "bf16", "-m", "vae_dist", launcher="vae_dist.launcher")
    r = subprocess.run([*cmd, "train", f"--data.shards={shard_dir}", f"--train.out_dir={run}", *COMMON,
                        "--train.max_steps=1", *extra], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_SILENT": "true"})
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("vae-dist: error:")]
    assert len(errors) == 1 and error in errors[0], r.stderr[-3000:]
    # issue 44, item 4: GPU precision launched where no CUDA is seen (launch_command hides GPUs), said once
    assert (r.stdout + r.stderr).count("this machine has no CUDA") == 1, r.stdout[-3000:]
    assert "Traceback" not in r.stderr and r.stderr.count("vae-dist: launch failed: rank") == 1, r.stderr[-3000:]
    # issue 44 review, finding 5: the silent rank waits, so rank 0 (the one that says why) exits first
    assert "vae-dist: launch failed: rank 0 " in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_rank_zero_failing_in_a_decision_stops_every_rank_with_its_traceback(shards, tmp_path):
    """issue 44 review, finding 11: an error on rank 0 that is not the user's, in a decision the
    other ranks wait for (here a manifest.json nested past Python's recursion limit, which json
    raises as RecursionError), reaches them at once: they stop in silence, rank 0's traceback is
    the report, and the launch ends well within the launcher's timeouts."""
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    cmd = launch_command(2, "-m", "vae_dist", launcher="vae_dist.launcher")
    start = time.monotonic()
    r = subprocess.run([*cmd, "train", f"--data.shards={deep}", f"--train.out_dir={tmp_path / 'run'}", *COMMON,
                        "--train.max_steps=1"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_SILENT": "true"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("RecursionError") >= 1 and r.stderr.count("Traceback") == 1, r.stderr[-3000:]
    assert "vae-dist: error:" not in r.stderr, r.stderr[-3000:]  # the other rank's SharedError stays silent
    assert "vae-dist: launch failed: rank 0 " in r.stderr and "exited with code 1 first" in r.stderr, r.stderr[-3000:]
    assert time.monotonic() - start < 120
    assert not (tmp_path / "run").exists()


def test_the_launcher_refuses_launch_options_accelerate_refuses_in_one_line(monkeypatch, capsys):
    # issue 44 review, finding 8: train_cpu_dev.sh with NUM_PROCESSES=1 (--multi_gpu with one process)
    from vae_dist import launcher

    monkeypatch.setattr(sys, "argv", ["vae_dist.launcher", "--multi_gpu", "--num_processes", "1",
                                      "--num_machines", "1", "--mixed_precision", "no", "-m", "vae_dist", "train"])
    assert launcher.main() == 2
    err = capsys.readouterr().err
    assert err == "vae-dist: error: accelerate launch: You need to use at least 2 processes to use `--multi_gpu`.\n"


@pytest.mark.slow
def test_a_diverged_run_under_two_processes_says_so_once(shards, tmp_path):
    """Every rank reads the same all-reduced counters and stops at the same sync point; the run
    reports it in one line, not one per rank, and keeps the rows written before."""
    run = tmp_path / "run"
    cmd = launch_command(2, "-m", "vae_dist", launcher="vae_dist.launcher")
    r = subprocess.run([*cmd, "train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON,
                        "--train.max_steps=40", "--train.max_bad_steps=2", "--optim.lr=1e30",
                        *(["--log.wandb_mode=offline"] if HAVE_WANDB else [])],  # a finish that takes a while
                       capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_SILENT": "true",
                                                                         "WANDB_API_KEY": ""})
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith("vae-dist: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "training diverged" in errors[0], r.stderr[-3000:]
    # issue 44 review, finding 5: rank 0 says why before its W&B finish, and exits first (the other waits)
    launch = [line for line in lines if line.startswith("vae-dist: launch failed:")]
    assert len(launch) == 1 and launch[0].startswith("vae-dist: launch failed: rank 0 "), r.stderr[-3000:]
    assert lines.index(errors[0]) < lines.index(launch[0])
    assert _rows(run)
