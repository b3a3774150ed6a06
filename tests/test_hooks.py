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
    for key in ("train/loss", "train/recon", "train/kl", "train/beta", "train/lr", "train/grad_norm",
                "train/img_per_s", "train/img_per_s_per_process", "train/data_wait", "val/loss", "val/psnr",
                "val/bpd", "val/elbo_nats"):
        assert key in keys, key
    assert "train/elbo" not in keys and "val/elbo" not in keys  # issue 44, item 3: one name, one quantity
    for picture in ("reconstructions", "samples", "interpolations", "latent_space"):
        assert f"images/{picture}/path" in keys, picture
        assert list(runs[0].glob(f"files/media/images/images/{picture}_*.png")), picture


def _check_loss_curves(metrics: Path) -> None:
    """Each curve of the loss-curve picture plots what its label says, read back from the
    figure against metrics.jsonl; the -ELBO is shown as val bits/dim, the objective as loss."""
    from vae_dist.viz import _run_recon, loss_curves_figure, read_metrics

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    val = [r for r in rows if r.get("split") == "val"]
    assert len(val) >= 2
    expected = {  # label: the rows and the metrics.jsonl key it plots
        "train loss": (train, "loss"), "train recon": (train, "recon"), "val loss": (val, "loss"),
        "train kl": (train, "kl"), "val kl": (val, "kl"), "val bpd": (val, "bpd"), "train beta": (train, "beta"),
    }
    fig = loss_curves_figure(*read_metrics(metrics), _run_recon(metrics))
    curves = {line.get_label(): (ax, line) for ax in fig.axes for line in ax.get_lines()}
    assert set(curves) == set(expected)
    for label, (chosen, key) in expected.items():
        ax, line = curves[label]
        assert list(line.get_xdata()) == [r["step"] for r in chosen], label
        assert list(line.get_ydata()) == [r[key] for r in chosen], label
    assert curves["val bpd"][0].get_ylabel() == "bits / subpixel" and "bits/dim" in curves["val bpd"][0].get_title()
    # issue 44 review, Low: the objective's unit is the run's (loss.recon=sum: the seed's sum of squares)
    for label, unit in (("train loss", "sum of squares / image (+ β·KL, nats)"),
                        ("val loss", "sum of squares / image (+ β·KL, nats)"), ("train kl", "nats / image")):
        ax = curves[label][0]
        assert ax.get_ylabel() == unit and "ELBO" not in ax.get_title() + ax.get_ylabel(), label


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


def _readme_metric_keys() -> dict[str, str]:
    """The README's table of logged keys: {key: where it is logged ("train", "val", "W&B", with a
    condition in brackets)}."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = readme.index("| key | logged in | unit | meaning |")
    keys = {}
    for line in readme[start + 2:]:
        if not line.startswith("|"):
            break
        key, where = (cell.strip() for cell in line.strip("|").split("|")[:2])
        keys[key.strip("`")] = where
    return keys


@needs_loader
def test_the_readme_lists_every_logged_key_and_no_other(shards, tmp_path):
    # issue 44, item 3: every key of metrics.jsonl's train and val rows and of the W&B run is in
    # the README's table, and every key the table names (but those of a GPU) is logged
    import torch

    run = tmp_path / "run"
    mode = "offline" if HAVE_WANDB else "disabled"
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *TINY_MODEL, "--train.batch_size=16",
                "--data.num_threads=1", "--log.log_every=2", "--train.max_steps=4", "--train.eval_every=2",
                "--log.image_every=4", "--loss.free_bits=0.1", "--log.peak_tflops=1", f"--log.wandb_mode={mode}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stdout  # 12 steps an epoch, a row every 2: nothing to warn about (item 7)
    table = _readme_metric_keys()

    def documented(kind: str) -> set[str]:
        return {k for k, where in table.items() if kind in where and (torch.cuda.is_available() or "CUDA" not in where)}

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = set().union(*(r for r in rows if "split" not in r))
    val = set().union(*(r for r in rows if r.get("split") == "val"))
    assert train == documented("train") and val == documented("val"), (train ^ documented("train"),
                                                                        val ^ documented("val"))
    assert "elbo" not in train | val and "elbo_nats" in val and "elbo_nats" not in train
    if not HAVE_WANDB:
        return
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    logged = history_keys(wandb_file)
    pictures = {k.split("/")[1] for k in logged if k.startswith("images/")}
    # every row key but `time` (the W&B row has its own) and `split` (the prefix says it) is train/KEY or val/KEY
    expected = ({f"train/{k}" for k in train - {"step", "time"}} | {f"val/{k}" for k in val - {"step", "time", "split"}}
                | {"step"} | {k for k in documented("W&B") if not k.startswith("images/")})
    ours = {k for k in logged if not k.startswith(("images/", "_"))}  # W&B's own: _step, _runtime, _timestamp
    assert ours == expected, ours ^ expected
    assert {f"images/{p}" for p in pictures} == {k for k in documented("W&B") if k.startswith("images/")}, pictures


def _metrics_rows(path: Path, train_steps, val_steps, **extra) -> Path:
    rows = [{"step": s, "epoch": s, "loss": 900.0 - s, "recon": 890.0 - s, "kl": 10.0, "beta": min(1.0, s / 10),
             "lr": 1e-3, **extra} for s in train_steps]
    rows += [{"split": "val", "step": s, "epoch": s, "loss": 950.0 - s, "recon": 940.0 - s, "kl": 10.0, "bpd": 7.0,
              "psnr": 15.0, **({"elbo": -59000.0} if extra else {"elbo_nats": -59000.0})} for s in val_steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_of_few_points_mark_them_and_beta_is_drawn(tmp_path):
    # issue 44, item 7: the README's small data set run (one train row, 20 val rows): every curve
    # shows its points; a line through one point drew nothing, the beta panel looked empty
    from vae_dist.viz import FEW_POINTS, loss_curves_figure, read_metrics

    fig = loss_curves_figure(*read_metrics(_metrics_rows(tmp_path / "m.jsonl", [20], range(1, 21))))
    curves = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert set(curves) == {"train loss", "train recon", "val loss", "train kl", "val kl", "val bpd", "train beta"}
    for label, line in curves.items():
        assert line.get_marker() == "o", label
    assert curves["train beta"].get_xydata().tolist() == [[20.0, 1.0]]
    assert curves["val loss"].get_xydata()[:, 0].tolist() == list(range(1, 21))
    (beta_ax,) = [ax for ax in fig.axes if curves["train beta"] in ax.get_lines()]
    assert [t.get_text() for t in beta_ax.get_legend().get_texts()] == ["train beta"]
    many = range(1, FEW_POINTS + 11)  # a long run: plain lines
    fig = loss_curves_figure(*read_metrics(_metrics_rows(tmp_path / "n.jsonl", many, [10, 20])))
    curves = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert curves["train loss"].get_marker() in ("None", "", None) and len(curves["train loss"].get_xdata()) == len(many)
    assert curves["val bpd"].get_marker() == "o"  # evaluations: always points


def test_the_objective_panel_is_labelled_in_the_unit_of_the_run_s_reconstruction_term(tmp_path):
    # issue 44 review, Low: `loss` is recon + β·KL, recon in the unit loss.recon gives it (README,
    # What a run logs), read from the run's config.yaml beside metrics.jsonl; the KL panel is nats
    from vae_dist.viz import _run_recon, loss_curves_figure, read_metrics

    metrics = _metrics_rows(tmp_path / "metrics.jsonl", range(2, 12, 2), [5, 10])
    units = {"sum": "sum of squares / image (+ β·KL, nats)",
             "mean": "squared error / subpixel (+ β·KL, nats / image)", "gaussian": "nats / image",
             None: "objective / image (recon + β·KL)"}  # no config.yaml: a bare metrics.jsonl
    for recon, unit in units.items():
        config = tmp_path / "config.yaml"
        config.unlink(missing_ok=True)
        if recon is not None:
            config.write_text(f"loss:\n  recon: {recon}\n")
        assert _run_recon(metrics) == recon
        fig = loss_curves_figure(*read_metrics(metrics), _run_recon(metrics))
        objective, kl = fig.axes[:2]
        assert objective.get_ylabel() == unit and kl.get_ylabel() == "nats / image", recon


def test_the_latent_traversal_says_what_its_rows_and_columns_are():
    # issue 44, item 10: rows name their latent dim and its KL (most first), columns the value it is set to
    import torch

    from vae_dist.model import VAE, VAEConfig
    from vae_dist.viz import traversal_figure

    torch.manual_seed(0)
    model = VAE(VAEConfig(widths=(8, 16, 16, 32), latent_dim=8)).eval()
    fig = traversal_figure(model, torch.rand(4, 3, 64, 64), dims=5, steps=7)
    (ax,) = fig.axes
    assert ax.get_title() == "latent traversal" and ax.get_ylabel() == "latent dim (most KL first)"
    assert "-3 to +3" in ax.get_xlabel() and "first image's mean" in ax.get_xlabel()
    columns = [t.get_text() for t in ax.get_xticklabels()]
    assert columns == ["-3", "-2", "-1", "0", "+1", "+2", "+3"]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == 5 and all(r.startswith("z[") and " KL " in r for r in rows), rows
    kls = [float(r.split("KL ")[1]) for r in rows]
    assert kls == sorted(kls, reverse=True) and len({r.split("]")[0] for r in rows}) == 5
    # each tick sits on the centre of its row / column of 64-pixel images
    assert [round(t) for t in ax.get_xticks()] == [2 + i * 66 + 32 for i in range(7)]
