"""Faults round four, on the training side: the run folder lost while training, a resume on
other data or another process count, a diverged run's checkpoints. Each ends in one line (or
is said plainly at the start) and nothing of the user's is lost or written over."""

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae_dist.checkpoint import list_checkpoints

from .conftest import match_checksum, needs_loader, run_cli
from .test_faults import COMMON, _one_line, _train, _wait_for_rows

pytestmark = needs_loader


def _while_training(shards, run: Path, act, *args, rows: int = 3):
    """Trains in this process while a thread does `act` once metrics.jsonl holds `rows` rows."""
    done = threading.Event()

    def watch():
        metrics = run / "metrics.jsonl"
        while not done.is_set():
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
                return act()
            time.sleep(0.01)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        return _train(shards, run, "--train.max_steps=100000", *args)
    finally:
        done.set()
        thread.join()


def _replace(run: Path) -> None:
    shutil.rmtree(run)
    run.mkdir()
    (run / "mine.txt").write_text("another run's file")


# issue 43, case 2: the run folder deleted (or replaced) while training
@pytest.mark.parametrize("act, what", [(shutil.rmtree, "was deleted while training"),
                                       (_replace, "was replaced by another folder while training")])
def test_a_run_whose_folder_is_deleted_or_replaced_stops_in_one_line_and_writes_nothing_more(shards, tmp_path,
                                                                                             act, what):
    run = tmp_path / "run"
    r = _while_training(shards, run, lambda: act(run))
    line = _one_line(r, f"run folder {run} {what} (at step ", "): the run stops and writes nothing more")
    assert int(line.split("(at step ")[1].split(")")[0]) < 100000, line
    if act is shutil.rmtree:
        assert not run.exists()  # not made again by a row, a checkpoint or a picture
    else:
        assert [p.name for p in run.iterdir()] == ["mine.txt"]  # nothing written into the new one


# issue 43, case 12: the run folder made read-only while training
@pytest.mark.slow
def test_a_run_folder_made_read_only_is_one_line_and_the_next_start_takes_over_its_lock(shards, tmp_path):
    """Read-only as a user's `chmod -w` makes it: no entry can be made or removed in the folder.
    As root (CI) chmod does not stop us, so the immutable attribute stands in (chattr +i)."""
    run = tmp_path / "run"
    args = ["train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON, "--train.checkpoint_every=4",
            "--train.max_steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "vae_dist", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_rows(run, proc, rows=5)  # past the checkpoint of step 8
    made = subprocess.run(["chattr", "+i", str(run)], capture_output=True, text=True)
    try:
        if made.returncode:
            proc.kill()
            pytest.skip(f"chattr +i does not work here: {made.stderr.strip()[:100]}")
        out, err = proc.communicate(timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(run)])
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    (line,) = err.strip().splitlines()
    assert line.startswith(f"vae-dist: error: run folder {run} became read-only while training (at step "), line
    assert (run / ".lock").is_file()  # it could not be removed: the next start takes it over
    r = _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=12")
    assert r.returncode == 0 and "which is no longer running" in r.stderr, r.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints'}" in r.stdout


# issue 43, case 4: divergence writes no checkpoint, logs skipped steps as skipped (no 0.0), and eval
# refuses its weights
def test_a_diverging_run_writes_no_checkpoint_and_its_skipped_steps_are_nan_not_zero(shards, tmp_path):
    run = tmp_path / "run"
    assert _train(shards, run, "--train.checkpoint_every=2", "--train.max_steps=4").returncode == 0
    r = _train(shards, run, "--train.checkpoint_every=2", "--train.max_steps=200", "--optim.lr=1e3",
               "--train.max_bad_steps=6")
    assert r.returncode == 2 and "non-finite steps in a row" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert "vae-dist: warning: no checkpoint at step 6: its last " in r.stderr, r.stderr[-2000:]
    assert "steps were non-finite (skipped); the newest checkpoint stays step_0000004" in r.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("split") != "val" and row["step"] > 4]
    assert all(row["skipped"] > 0 for row in train[1:]), train
    # no good step to average: null in the JSON (strict JSON has no NaN), NaN in the line and to W&B
    assert all(row[k] is None for row in train[1:] for k in ("loss", "recon", "kl", "grad_norm")), train
    assert not any(row[k] == 0.0 for row in train for k in ("loss", "grad_norm")), train
    from vae_dist.viz import read_metrics

    assert math.isnan(read_metrics(run / "metrics.jsonl")[0][train[-1]["step"]]["loss"])
    assert " | skipped 2 non-finite" in r.stdout and "loss       nan" in r.stdout

    # an older version's checkpoint written during a streak: resume=auto passes over it
    newest = run / "checkpoints" / "step_0000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    (newest / "trainer_state.json").write_text(json.dumps({**state, "bad_steps": 3}))
    match_checksum(newest, "trainer_state.json")
    r = _train(shards, run, "--train.checkpoint_every=2", "--train.max_steps=4")
    assert f"skipping checkpoint {newest}: written after 3 non-finite steps in a row (the run was diverging)" \
        in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0 and "at step 2 (epoch" in r.stdout, r.stdout[-2000:]

    # weights with a NaN, or so large that the model's outputs are not finite: eval says so in one line
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    tensors = load_file(weights)
    for name, scale, words in ((next(iter(tensors)), float("nan"), "holds non-finite weights (NaN or inf in "),
                               (None, 1e30, "gives non-finite outputs on val (ELBO ")):
        damaged = {k: v * scale if name in (None, k) else v for k, v in tensors.items()}
        save_file(damaged, tmp_path / "w.safetensors", metadata=safe_open(str(weights), "pt").metadata())
        r = run_cli("eval", str(tmp_path / "w.safetensors"), "--shards", str(shards), "--calib-images", "16")
        _one_line(r, words)


# issue 43, case 3: a resume on other shards than the checkpoint's is refused, naming both, unless asked for
def test_a_resume_on_other_shards_is_refused_naming_both_unless_asked_for(shards, sample_root, tmp_path):
    from vae_dist.data.pack import PackOptions, pack
    from vae_dist.data.shards import ShardSet

    run, other = tmp_path / "run", tmp_path / "other"
    pack(sample_root, other, PackOptions(shard_size=64, workers=1, seed=1))  # the same images, another order
    mine, theirs = ShardSet.open(shards).identity(), ShardSet.open(other).identity()
    assert mine["digest"] != theirs["digest"]
    assert _train(shards, run, "--train.checkpoint_every=4", "--train.max_steps=4").returncode == 0
    r = _train(other, run, "--train.checkpoint_every=4", "--train.max_steps=8")
    _one_line(r, f"checkpoint {run / 'checkpoints' / 'step_0000004'} was trained on the shards in {mine['shards']} "
                 f"(data {mine['digest']}); data.shards={theirs['shards']} holds other data ({theirs['digest']}): a "
                 f"resume there would not continue the same sample order", "train.resume_other_data=true")
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004"]  # nothing moved or written

    r = _train(other, run, "--train.checkpoint_every=4", "--train.max_steps=8", "--train.resume_other_data=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"holds other data ({theirs['digest']}): resuming on them anyway (train.resume_other_data=true)" in r.stdout
    assert f"data_digest={theirs['digest']}" in r.stdout and "resume_other_data: true" in (run / "config.yaml").read_text()
    saved = json.loads((run / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())["data"]
    assert saved == {**theirs, "order": "global"}  # from here on the run is one on the other shards

    # issue 45: the same shards in another train order (data.shuffle) would not continue the epoch either
    r = _train(other, run, "--train.checkpoint_every=4", "--train.max_steps=12", "--data.shuffle=shards")
    _one_line(r, f"checkpoint {run / 'checkpoints' / 'step_0000008'} was trained in the global order; this run's "
                 f"data.shuffle resolves to shards/16: a resume would not continue the same sample order")


# issue 43, case 9: a resume with another process count or batch says what changed
def test_a_resume_with_another_global_batch_says_the_epoch_is_cut_short(shards, tmp_path):
    run = tmp_path / "run"
    assert _train(shards, run, "--train.checkpoint_every=3", "--train.max_steps=3").returncode == 0
    r = _train(shards, run, "--train.checkpoint_every=3", "--train.max_steps=4", "--train.batch_size=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"resumed from {run / 'checkpoints' / 'step_0000003'} at step 3 (epoch 1); it was written by 1 process "
            f"at a global batch of 16, this run has 1 process at a global batch of 8, so the data splits differently: "
            f"the rest of epoch 0 is skipped (the checkpoint was 3 of its batches into it) and this run starts epoch 1 "
            f"at step 3") in r.stdout, r.stdout[-2000:]
