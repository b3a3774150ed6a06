"""Faults and bad input as a user meets them: one clear line, nothing already written lost."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from vae_dist.checkpoint import CHECKSUMS, latest_checkpoint, list_checkpoints

from .conftest import TINY_MODEL, needs_dali, needs_loader, needs_wandb, needs_webdataset, run_cli
from .wandb_reader import exit_code

COMMON = [*TINY_MODEL, "--train.batch_size=16", "--data.num_threads=1", "--log.wandb_mode=disabled",
          "--log.log_every=2", "--log.image_every=1000", "--train.eval_every=0"]


def _train(shards, run, *args):
    return run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON, *args)


def _one_line(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _wait_for_rows(run: Path, proc, rows=2, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    # an ended run's stderr reads to its end; a live one's would block, so it is not read
    why = f"it exited {proc.returncode}: {proc.stderr.read()[-2000:] if proc.stderr else ''}" \
        if proc.poll() is not None else f"none in {timeout} s"
    raise AssertionError(f"the run did not log {rows} rows: {why}")


@needs_loader
def test_damaged_newest_checkpoint_is_skipped_with_one_line_and_an_explicit_one_is_refused(shards, tmp_path):
    run = tmp_path / "run"
    r = _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=8")
    assert r.returncode == 0, r.stderr[-2000:]
    newest = latest_checkpoint(run)
    assert newest.name == "step_0000008"
    record = json.loads((newest / CHECKSUMS).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "config.yaml", "rng_rank0.pt"} <= set(record)
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # truncated, as a crash or a full disk leaves it
        f.truncate(size // 2)

    r = _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=12")
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = [line for line in r.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and "step_0000008" in skipped[0] and f"{size // 2} bytes, {size} were written" \
        in skipped[0], r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert latest_checkpoint(run).name == "step_0000012"

    # the same damage in a checkpoint named explicitly: refused in one line
    ckpt = latest_checkpoint(run)
    (ckpt / "optimizer.pt").write_bytes(b"\0" * (ckpt / "optimizer.pt").stat().st_size)  # same size, zeros
    r = _train(shards, run, f"--train.resume={ckpt}", "--train.max_steps=16")
    _one_line(r, "does not verify", "optimizer.pt does not match its sha256")


@needs_loader
def test_checkpoint_without_its_checksums_is_incomplete(shards, tmp_path):
    """What a power loss before the last write leaves: never trusted."""
    run = tmp_path / "run"
    assert _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=8").returncode == 0
    (latest_checkpoint(run) / CHECKSUMS).unlink()
    r = _train(shards, run, "--train.max_steps=10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping checkpoint" in r.stderr and "no checksums.json" in r.stderr and "at step 4" in r.stdout


def test_checkpoint_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    """Every file is flushed before the rename, the folder after it."""
    import torch
    from accelerate import Accelerator

    from vae_dist import checkpoint
    from vae_dist.model import VAE, VAEConfig

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    acc = Accelerator(cpu=True)
    model = VAE(VAEConfig(widths=(8, 16), latent_dim=4, image_size=16))
    opt = torch.optim.Adam(model.parameters())
    path = checkpoint.save_checkpoint(acc, tmp_path, model, opt, {"step": 5}, "x: 1\n", keep_last=2)
    tmp = str(path.parent / ".tmp-step_0000005")
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json", "config.yaml", "rng_rank0.pt", CHECKSUMS):
        assert f"{tmp}/{name}" in synced, (name, synced)
    assert tmp in synced  # the folder's entries before the rename
    assert str(path.parent) in synced  # the rename itself
    assert checkpoint.verify_checkpoint(path) is None


@pytest.mark.slow
@needs_loader
def test_second_run_into_a_busy_folder_exits_at_once_naming_the_holder(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vae_dist", "train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON,
           "--train.max_steps=100000", "--train.checkpoint_every=0"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(run, first)
        rows_before = (run / "metrics.jsonl").read_text().count("\n")
        t0 = time.time()
        r = _train(shards, run, "--train.max_steps=4")
        line = _one_line(r, "is in use by pid", str(first.pid), socket.gethostname(), "since")
        assert time.time() - t0 < 60, line
        assert (run / "metrics.jsonl").read_text().count("\n") >= rows_before  # the first run's rows are intact
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert not (run / ".lock").exists()  # released on the way out


@needs_loader
def test_lock_of_a_dead_process_is_taken_over_with_a_warning(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "yesterday"}))
    r = _train(shards, run, "--train.max_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"taking over the lock of pid {dead.pid} (since yesterday)" in r.stderr
    assert not (run / ".lock").exists()


@needs_loader
def test_fresh_run_into_an_old_run_folder_is_refused_or_moved_aside(shards, tmp_path):
    run = tmp_path / "run"
    assert _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=8").returncode == 0
    old_rows = (run / "metrics.jsonl").read_text()
    r = _train(shards, run, "--train.resume=none", "--train.max_steps=4")
    _one_line(r, f"run folder {run} holds another run", "metrics.jsonl", "checkpoints", "train.resume=auto",
              "train.overwrite=true")
    assert (run / "metrics.jsonl").read_text() == old_rows  # untouched
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004", "step_0000008"]

    r = _train(shards, run, "--train.resume=none", "--train.overwrite=true", "--train.max_steps=4",
               "--train.checkpoint_every=2")
    assert r.returncode == 0, r.stderr[-2000:]
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved the previous run in {run} to {aside}" in r.stdout
    assert (aside / "metrics.jsonl").read_text() == old_rows  # nothing lost
    assert [p.name for p in list_checkpoints(aside)] == ["step_0000004", "step_0000008"]
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]  # not pruned for step 8
    assert max(json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()) == 4


@needs_loader
def test_all_checkpoints_damaged_is_refused_not_restarted_over_them(shards, tmp_path):
    run = tmp_path / "run"
    assert _train(shards, run, "--train.checkpoint_every=0", "--train.max_steps=4").returncode == 0
    (latest_checkpoint(run) / "model.safetensors").write_bytes(b"")
    r = _train(shards, run, "--train.max_steps=8")
    assert "skipping checkpoint" in r.stderr
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("vae-dist: error: run folder")
    assert "no checkpoint that verifies" in r.stderr and "train.overwrite=true" in r.stderr


@pytest.mark.slow
@needs_webdataset
def test_training_without_dali_falls_back_to_webdataset(shards, tmp_path):
    """As on a machine where the DALI wheel is missing: importing it fails."""
    code = ("import sys; sys.modules['nvidia.dali'] = None; from vae_dist.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "train", f"--data.shards={shards}",
                        f"--train.out_dir={tmp_path / 'run'}", *COMMON, "--train.max_steps=2",
                        "--data.cache=none"],  # streaming, also where a GPU cache would be chosen
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loader=webdataset" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, "train", f"--data.shards={shards}",
                        f"--train.out_dir={tmp_path / 'run2'}", *COMMON, "--train.max_steps=2", "--data.loader=dali"],
                       capture_output=True, text=True, timeout=300)
    _one_line(r, "data.loader=dali but NVIDIA DALI is not installed")


@pytest.mark.parametrize("value", ["0", "-64"])
def test_nonpositive_global_batch_is_one_line(shards, tmp_path, value):
    _one_line(_train(shards, tmp_path, f"--train.global_batch_size={value}"),
              f"config key 'train.global_batch_size' must be positive, got {value}")


@needs_dali
@needs_webdataset
def test_bench_row_that_cannot_be_measured_says_why_and_the_others_are_measured(shards, sample_root, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(sample_root, images)
    # the seed loader has no Resize: an odd-sized image breaks its batch. Every 4th one is odd,
    # since it shuffles unseeded and drops the last partial batch: a single odd image missed
    # all 9 batches read (1 epoch and 3 batches of 6 per epoch) in ~2% of runs
    for victim in sorted((images / "train").rglob("*.JPEG"))[::4]:
        Image.new("RGB", (80, 80), "red").save(victim, "JPEG")
    out = tmp_path / "d.json"
    r = run_cli("bench", "data", "--tiny", "--repeats", "1", "--shards", str(shards), "--images", str(images),
                "--threads", "1", "--steps", "8", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    seed = rows["seed: ImageFolder+PIL DataLoader"]
    # collate's own words for the odd-sized image: which depends on where in the (shuffled)
    # batch it falls, since a worker stacks into a preallocated shared-memory tensor
    why = ("stack expects each tensor to be equal size", "Trying to resize storage that is not resizable")
    assert seed["unavailable"].startswith("failed: ") and any(w in seed["unavailable"] for w in why), seed
    assert rows["dali-cpu"]["img_per_s"] > 0 and rows["webdataset+torchvision (PyTorch)"]["img_per_s"] > 0
    assert "stack expects" in r.stdout or "Trying to resize" in r.stdout  # the printed table says it too


@needs_loader
def test_weights_and_checkpoints_that_are_not_ours_are_one_line(shards, tmp_path):
    text = tmp_path / "some.txt"
    text.write_text("hello")
    _one_line(run_cli("viz", str(text), str(tmp_path / "o1")), "is not a readable safetensors file")
    import torch
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    _one_line(run_cli("viz", str(foreign), str(tmp_path / "o2")), "holds no vae_config metadata")

    run = tmp_path / "run"
    assert _train(shards, run, "--train.max_steps=2").returncode == 0
    ckpt = latest_checkpoint(run)
    (ckpt / "model.safetensors").unlink()
    _one_line(run_cli("viz", str(ckpt), str(tmp_path / "o3")), "has no model.safetensors")
    _one_line(_train(shards, run, f"--train.resume={ckpt}", "--train.max_steps=4"),
              "does not verify", "model.safetensors is missing")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@needs_loader
@needs_wandb
def test_divergence_finishes_the_wandb_run(shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}",
                *[a for a in COMMON if not a.startswith("--log.wandb_mode")], "--log.wandb_mode=offline",
                "--optim.lr=1e30", "--train.max_bad_steps=3", "--train.max_steps=200", env={"WANDB_API_KEY": ""})
    _one_line(r, "non-finite steps in a row")
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert exit_code(wandb_file) == 1  # finished, marked failed
    assert (run / "metrics.jsonl").read_text().strip()  # the rows before the failure are kept


def test_small_cli_cases(tmp_path):
    from vae_dist.config import build_config

    assert build_config(None, ["--model.widths=8,16"]).model.widths == (8, 16)
    r = run_cli("bench", "step", "--tiny", "--repeats", "1", "--compile", "off", "--channels-last", "off",
                "--dtypes", "fp16", "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads((tmp_path / "s.json").read_text())["results"]
    assert row["dtype"] == "fp16" and "fp16" in row["name"] and row["img_per_s"] > 0, row
    assert row["autocast"] == "torch.float16"  # what ran, not only the label
    _one_line(run_cli("bench", "step", "--tiny", "--dtypes", "fp8"), "unknown --dtypes fp8")
    _one_line(run_cli("demo", "--steps", "0", "--out", str(tmp_path / "d")), "demo --steps must be positive")


@pytest.mark.slow
@needs_loader
def test_demo_with_two_steps(tmp_path):
    r = run_cli("demo", "--steps", "2", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "demo" / "run" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "pictures" / "samples.png").is_file()


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "split" not in line]


@needs_loader
def test_resuming_an_older_checkpoint_keeps_the_new_line_and_sets_the_abandoned_one_aside(shards, tmp_path):
    run = tmp_path / "run"
    assert _train(shards, run, "--train.checkpoint_every=2", "--train.max_steps=6", "--log.log_every=1").returncode == 0
    old_rows = _steps_logged(run)
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004", "step_0000006"]

    # back to step 2, keeping two: the new checkpoints 3, 4, 5 must not lose to the old 4 and 6
    r = _train(shards, run, f"--train.resume={run / 'checkpoints' / 'step_0000002'}", "--train.keep_last=2",
               "--train.checkpoint_every=1", "--train.max_steps=5", "--log.log_every=1")
    assert r.returncode == 0, r.stderr[-2000:]
    (aside,) = (run / "abandoned").iterdir()
    assert aside.name.startswith("after-step_0000002-")
    assert f"set aside what lay beyond step_0000002 (later checkpoints, metrics rows) in {aside}" in r.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004", "step_0000005"]  # the new line's newest
    assert json.loads((run / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())["batch_size"] == 16
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_0000004", "step_0000006"]  # kept whole
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()
            if "split" not in x] == [s for s in old_rows if s > 2]
    assert _steps_logged(run) == [1, 2, 3, 4, 5]  # one line of rows: the old 3..6 are in the aside folder

    r = _train(shards, run, "--train.max_steps=7", "--log.log_every=1")  # resume=auto follows the new line
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at step 5 (epoch" in r.stdout and "set aside" not in r.stdout
    assert _steps_logged(run) == [1, 2, 3, 4, 5, 6, 7]


def test_two_runs_moving_aside_in_one_second_get_two_folders(tmp_path):
    from vae_dist.files import new_dir_beside

    base = tmp_path / "run.old-20261201-101500"
    assert [new_dir_beside(base).name for _ in range(3)] == [base.name, f"{base.name}-2", f"{base.name}-3"]


def test_two_takers_of_one_dead_lock_cannot_both_win(tmp_path):
    """The second taker judged the same dead holder stale, but the first has taken the lock
    over meanwhile: the second must see a live holder, not remove the first's lock."""
    from vae_dist.errors import UserError
    from vae_dist.run_folder import RunFolderLock

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "since": "yesterday"}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    first, second = RunFolderLock(tmp_path), RunFolderLock(tmp_path)
    first.acquire()  # took over the dead holder's lock
    ours = json.loads((tmp_path / ".lock").read_text())
    assert ours["pid"] == os.getpid() and first.held
    assert second._remove_if_unchanged(stale) is False  # what it would have removed is the first's lock
    assert json.loads((tmp_path / ".lock").read_text()) == ours  # put back
    sleeper = subprocess.Popen(["sleep", "30"])  # a live holder on this host
    try:
        (tmp_path / ".lock").write_text(json.dumps({**ours, "pid": sleeper.pid}))
        with pytest.raises(UserError, match=f"in use by pid {sleeper.pid}"):
            second.acquire()
    finally:
        sleeper.kill()
    assert not list(tmp_path.glob(".lock.stale-*"))


def _main(capsys, *argv) -> str:
    """The command in this process (no interpreter start per case): exit 2 and one line."""
    from vae_dist.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], (code, err)
    return err[0]


@pytest.fixture(scope="module")
def weights(shards, tmp_path_factory):
    from vae_dist.checkpoint import save_weights
    from vae_dist.model import VAE, VAEConfig

    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    save_weights(VAE(VAEConfig(widths=(8, 16, 16, 32), latent_dim=8)), path)
    return path


@pytest.mark.parametrize("case, words", [
    (["eval", "{w}", "--shards", "{s}", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["eval", "{w}", "--shards", "{s}", "--calib-images", "0"], "--calib-images must be at least 1, got 0"),
    (["viz", "{w}", "{t}/v", "--shards", "{s}", "--num-images", "0"], "--num-images must be at least 1, got 0"),
    (["sample", "{w}", "{f}"], "sample output folder {f} is a file"),
    (["viz", "{w}", "{f}", "--shards", "{s}"], "viz output folder {f} is a file"),
    (["pack", "{r}", "{f}"], "pack output folder {f} is a file"),
    (["sample-data", "{f}"], "sample-data output folder {f} is a file"),
    (["demo", "--out", "{f}"], "demo --out {f} is a file"),
    (["train", "--data.shards={s}", "--train.out_dir={f}", *TINY_MODEL], "train.out_dir {f} is a file"),
    (["pack", "{r}", "{t}/p", "--workers", "-1"], "--workers must be 0 (all cores) or more, got -1"),
    (["pack", "{r}", "{t}/p", "--image-size", "0"], "--image-size must be a multiple of 16 from 16 to 512"),
    (["pack", "{r}", "{t}/p", "--image-size", "1024"], "--image-size must be a multiple of 16 from 16 to 512"),
    (["bench", "step", "--tiny", "--image-size", "40"], "--image-size must be a multiple of 16 from 16 to 512"),
    (["pack", "{r}", "{t}/p", "--val-fraction", "0.1"], "--val-fraction does not apply to Tiny ImageNet"),
    (["pack", "{t}", "{t}/p", "--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    (["pack", "{t}", "{t}/p", "--splits", "train,test"], "--splits asks for test, but {t} has no test/ folder"),
    (["pack", "{t}", "{t}/p", "--layout", "classes"], "--layout classes, but {t} holds no class folders"),
    (["pack", "{r}", "{t}/p", "--quality", "101"], "--quality must be in 1..100, got 101"),
    (["sample", "{w}", "{f}/sub"], "cannot make sample output folder {f}/sub: Not a directory"),
    (["train", "--model.compile=true", "--model.compile_mode=foo"], "config key 'model.compile_mode' must be one of"),
    (["train", "--optim.betas=1.5,0.999"], "config key 'optim.betas' must be two numbers in [0, 1), got [1.5, 0.999]"),
    (["train", "--optim.min_lr_ratio=2"], "config key 'optim.min_lr_ratio' must be in [0, 1], got 2.0"),
    (["train", "--optim.sigma_lr_scale=0"], "config key 'optim.sigma_lr_scale' must be positive, got 0.0"),
    (["train", "--train.eval_batches=2"], "unknown config key 'train.eval_batches': it is now train.eval_images"),
    (["train", "--data.shards={s}", "--train.out_dir={t}/r", "--model.image_size=32", *TINY_MODEL],
     "model.image_size=32 but the shards in {s} hold 64x64 images: leave model.image_size unset (it follows "
     "the shards) or pack with --image-size 32"),
    (["train", "--data.shards={s}", "--train.out_dir={t}/r", "--model.in_channels=1", *TINY_MODEL],
     "model.in_channels=1 but the shards in {s} hold RGB images"),
    (["eval", "{w32}", "--shards", "{s}"], "the model in {w32} takes 32x32 images but the shards in {s} hold 64x64"),
    (["viz", "{w32}", "{t}/v", "--shards", "{s}"], "the model in {w32} takes 32x32 images"),
    (["encode", "{w32}", "--shards", "{s}", "--out", "{t}/e.npz"], "the model in {w32} takes 32x32 images"),
    (["encode", "{w}", "--shards", "{s}", "--out", "{t}"], "encode --out {t} is a folder: name the .npz file"),
    (["bench", "data", "--tiny", "--shards", "{t}/missing"], "shard folder not found: {t}/missing"),
    (["bench", "comm", "--tiny", "--world", "1"], "bench comm --world must be a comma list of process counts of 2 or "
     "more, got '1'"),
    (["bench", "comm", "--tiny", "--world", "two"], "bench comm --world must be a comma list of process counts"),
    (["train", "--train.grad_accum_steps=0"], "config key 'train.grad_accum_steps' must be positive, got 0"),
    (["train", "--train.ddp_bucket_mb=0"], "config key 'train.ddp_bucket_mb' must be positive, got 0"),
    (["train", "--train.powersgd_start=1"],
     "config key 'train.powersgd_start' must be 2 or more (PowerSGD's start_powerSGD_iter), got 1"),
    (["train", "--train.ddp_comm_hook=int8"], "config key 'train.ddp_comm_hook' must be one of"),
])
def test_bad_arguments_are_one_line(shards, sample_root, weights, tmp_path, capsys, case, words):
    from vae_dist.checkpoint import save_weights
    from vae_dist.model import VAE, VAEConfig

    (tmp_path / "a-file").write_text("not a folder")
    save_weights(VAE(VAEConfig(widths=(8, 16), latent_dim=8, image_size=32)), tmp_path / "w32.safetensors")
    names = {"w": weights, "s": shards, "t": tmp_path, "f": tmp_path / "a-file", "r": sample_root,
             "w32": tmp_path / "w32.safetensors"}
    fill = lambda text: text.format(**{k: str(v) for k, v in names.items()})  # noqa: E731
    line = _main(capsys, *map(fill, case))
    assert fill(words) in line, line
    assert (tmp_path / "a-file").read_text() == "not a folder"  # nothing written over it


@needs_loader
def test_encode_prints_the_file_it_writes(shards, weights, tmp_path, capsys):
    from vae_dist.cli import main

    assert main(["encode", str(weights), "--shards", str(shards), "--out", str(tmp_path / "latents")]) == 0
    assert f"labels: {tmp_path / 'latents.npz'}" in capsys.readouterr().out
    assert (tmp_path / "latents.npz").is_file() and not (tmp_path / "latents").exists()


def test_a_failed_viz_or_encode_makes_no_output_folder(weights, tmp_path, capsys):
    """The output folder is made once the inputs are known good: a missing shard folder leaves
    nothing behind."""
    missing = tmp_path / "missing"
    for argv in (["viz", str(weights), str(tmp_path / "pics" / "v"), "--shards", str(missing)],
                 ["encode", str(weights), "--shards", str(missing), "--out", str(tmp_path / "lat" / "v.npz")]):
        assert f"shard folder not found: {missing}" in _main(capsys, *argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
