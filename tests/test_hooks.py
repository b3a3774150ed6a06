"""Rank-zero hooks: W&B offline runs read back from disk, pictures, broken loggers, viz.
The two-rank W&B run is read back by tests/test_train.py's DDP launch (check_pictures_and_wandb)."""

import json
from pathlib import Path

import pytest

from vae_dist.hooks import wandb_mode

from .conftest import HAVE_WANDB, TINY_MODEL, needs_loader, needs_wandb, run_cli
from .wandb_reader import history_keys

ARGS = [*TINY_MODEL, "--train.batch_size=16", "--data.num_threads=1", "--log.log_every=2",
        "--train.eval_every=6", "--log.image_every=6", "--train.checkpoint_every=0", "--train.max_steps=12"]


def check_pictures_and_wandb(run: Path, steps: tuple[int, ...]) -> None:
    """What rank 0 alone writes in a run of two ranks (tests/test_train.py's launch): the pictures
    at each image step, the loss curves, and, with wandb, one offline W&B run (rank 1 made none)
    holding every scalar and the pictures."""
    for picture in ("reconstructions", "samples", "interpolations", "latent_space", "traversal"):
        for step in steps:
            assert (run / "images" / f"{picture}_step{step:07d}.png").is_file(), (picture, step)
    assert (run / "images" / "loss_curves.png").stat().st_size > 1000
    _check_loss_curves(run / "metrics.jsonl")
    if not HAVE_WANDB:
        return
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 1 made none
    wandb_files = list(runs[0].glob("run-*.wandb"))
    assert len(wandb_files) == 1
    keys = history_keys(wandb_files[0])
    for key in ("train/loss", "train/recon", "train/kl", "train/beta", "train/elbo", "train/lr", "train/grad_norm",
                "train/img_per_s", "train/img_per_s_per_process", "train/data_wait", "val/loss", "val/psnr",
                "val/bpd"):
        assert key in keys, key
    for picture in ("reconstructions", "samples", "interpolations", "latent_space"):
        assert f"images/{picture}/path" in keys, picture
        assert list(runs[0].glob(f"files/media/images/images/{picture}_*.png")), picture


def _check_loss_curves(metrics: Path) -> None:
    """Each curve of the loss-curve picture plots what its label says, read back from the
    figure against metrics.jsonl; the -ELBO is shown as val bits/dim, the objective as loss."""
    from vae_dist.viz import loss_curves_figure, read_metrics

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    val = [r for r in rows if r.get("split") == "val"]
    assert len(val) >= 2
    expected = {  # label: the rows and the metrics.jsonl key it plots
        "train loss": (train, "loss"), "train recon": (train, "recon"), "val loss": (val, "loss"),
        "train kl": (train, "kl"), "val kl": (val, "kl"), "val bpd": (val, "bpd"), "train beta": (train, "beta"),
    }
    fig = loss_curves_figure(*read_metrics(metrics))
    curves = {line.get_label(): (ax, line) for ax in fig.axes for line in ax.get_lines()}
    assert set(curves) == set(expected)
    for label, (chosen, key) in expected.items():
        ax, line = curves[label]
        assert list(line.get_xdata()) == [r["step"] for r in chosen], label
        assert list(line.get_ydata()) == [r[key] for r in chosen], label
    assert curves["val bpd"][0].get_ylabel() == "bits / subpixel" and "bits/dim" in curves["val bpd"][0].get_title()
    for label in ("train loss", "val loss", "train kl"):
        ax = curves[label][0]
        assert ax.get_ylabel() == "nats / image" and "ELBO" not in ax.get_title() + ax.get_ylabel(), label


@needs_loader
@needs_wandb
def test_broken_wandb_is_reported_once_and_training_finishes(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb").write_text("a file where W&B wants its folder")
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *ARGS, "--log.wandb_mode=offline")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "wandb failed" in line]
    assert len(warnings) == 1, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 12
    assert (run / "model.safetensors").is_file()


@needs_loader
def test_viz_from_checkpoint_and_weights(shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *ARGS, "--log.wandb_mode=disabled",
                "--train.checkpoint_every=6")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("viz", str(run / "checkpoints" / "step_0000006"), str(tmp_path / "pics"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("reconstructions", "samples", "interpolations", "traversal", "latent_space"):
        assert (tmp_path / "pics" / f"{name}.png").stat().st_size > 500
    r = run_cli("viz", str(run / "model.safetensors"), str(tmp_path / "pics2"), "--shards", str(shards))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pics2" / "loss_curves.png").is_file()
    r = run_cli("viz", str(tmp_path / "nothing"), str(tmp_path / "pics3"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_wandb_mode_defaults_offline_without_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    assert wandb_mode("disabled") == "disabled"


@pytest.mark.slow
@needs_loader
def test_progress_plain_lines_in_a_log_and_a_live_bar_on_a_terminal(shards, tmp_path):
    import os
    import pty
    import subprocess
    import sys

    args = ["train", f"--data.shards={shards}", *ARGS, "--log.wandb_mode=disabled", "--train.eval_every=0"]
    r = run_cli(*args, f"--train.out_dir={tmp_path / 'log'}")
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [line for line in r.stdout.splitlines() if line.startswith("step")]
    assert steps[0].startswith("step       2/12 (16.7%) | epoch 0 |") and "ETA " in steps[0], steps[0]
    assert "\r" not in r.stdout and "%|" not in r.stdout  # no bar in a log
    rows = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "split" not in row]
    assert train[-1]["progress"] == 1.0 and train[-1]["eta_s"] == 0 and 0 < train[0]["progress"] < 1

    main, sub = pty.openpty()  # a terminal
    proc = subprocess.Popen([sys.executable, "-m", "vae_dist", *args, f"--train.out_dir={tmp_path / 'tty'}"],
                            stdout=sub, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"})
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=300) == 0
    text = out.decode(errors="replace")
    assert "12/12" in text and ("step/s" in text or "s/step" in text), text[-1500:]
    assert "step       2/12 (16.7%)" in text  # the rows are still written, above the bar
