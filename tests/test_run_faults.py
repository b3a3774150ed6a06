"""Faults round four, on the training side: the run folder lost while training, a resume on
other data or another process count, a diverged run's checkpoints. Each ends in one line (or
is said plainly at the start) and nothing of the user's is lost or written over."""

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import needs_loader
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
