"""The optional packages (NVIDIA DALI, webdataset, wandb) absent, as on the GPU machine until
they are carried there: the suite collects, what needs one skips and says why, and the
commands that need none still run. Real subprocesses, with the packages hidden from every
Python process they start (tests/hide_modules/sitecustomize.py)."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, TINY_MODEL, needs_dali

pytestmark = pytest.mark.slow  # a fresh interpreter per check, all of it

HIDE = ROOT / "tests" / "hide_modules"
ALL_THREE = "nvidia.dali,webdataset,wandb"


def _env(hidden: str) -> dict:
    path = os.pathsep.join(p for p in (str(HIDE), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "VAE_DIST_HIDE_MODULES": hidden, "WANDB_SILENT": "true"}


def _run(hidden: str, *args: str, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=_env(hidden),
                          timeout=timeout)


def test_the_hiding_is_real():
    code = ("import importlib.util as u, sys; from vae_dist.data import dali; "
            "print([u.find_spec(m) is None for m in ('nvidia.dali', 'webdataset', 'wandb')], dali.HAVE_DALI)")
    r = _run(ALL_THREE, "-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[True,", "True,", "True]", "False"], r.stdout


def test_suite_parts_pass_without_them_and_say_why_they_skip():
    """The data, cache, config and model modules: every test passes or skips with its reason."""
    r = _run(ALL_THREE, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_data.py",
             "tests/test_cache.py", "tests/test_config.py", "tests/test_model.py", timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    assert "NVIDIA DALI is not installed" in out and "wandb is not installed" in out, out[-3000:]
    assert "neither NVIDIA DALI nor webdataset is installed" in out, out[-3000:]
    assert " passed" in out.splitlines()[-1], out[-500:]


def test_commands_without_a_loader_say_so_in_one_line_and_bench_step_runs(shards, tmp_path):
    r = _run(ALL_THREE, "-m", "vae_dist", "train", f"--data.shards={shards}", f"--train.out_dir={tmp_path / 'r'}",
             *TINY_MODEL, "--log.wandb_mode=disabled", "--train.max_steps=2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "no data loader: neither NVIDIA DALI" in lines[0] and "nor webdataset" in lines[0], lines
    r = _run(ALL_THREE, "-m", "vae_dist", "bench", "step", "--tiny", "--repeats", "1", "--compile", "off",
             "--channels-last", "off")
    assert r.returncode == 0 and "eager fp32" in r.stdout, r.stderr[-2000:]


@needs_dali
def test_training_with_dali_alone(shards, tmp_path):
    """The GPU machine once the DALI parts arrived but not small.tar: DALI streams, no W&B."""
    r = _run("webdataset,wandb", "-m", "vae_dist", "train", f"--data.shards={shards}",
             f"--train.out_dir={tmp_path / 'r'}", *TINY_MODEL, "--train.batch_size=16", "--data.num_threads=1",
             "--log.wandb_mode=offline", "--train.max_steps=2", "--data.cache=none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loader=dali" in r.stdout
    assert "wandb failed" in r.stderr  # asked for W&B without it: one warning, training goes on
    r = _run("webdataset,wandb", "-m", "vae_dist", "train", f"--data.shards={shards}",
             f"--train.out_dir={tmp_path / 'r2'}", *TINY_MODEL, "--train.max_steps=2", "--data.loader=webdataset",
             "--log.wandb_mode=disabled")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "webdataset package is not installed" in lines[0], r.stderr


def test_whole_suite_collects_without_them_and_every_dali_test_carries_the_dali_marker():
    """With the three hidden, every test file collects; and `pytest -m dali` selects every test
    that needs DALI (the DALI window on a GPU machine runs just those), the GPU ones and the
    streaming one included; `-m "not dali"` none of them. One collection: each test's markers
    as pytest has them once collected (the conftest adds some)."""
    code = ("import json, sys, pytest\n"
            "class Markers:\n"
            "    def pytest_collection_finish(self, session):\n"
            "        self.dali = {i.nodeid: i.get_closest_marker('dali') is not None for i in session.items}\n"
            "m = Markers()\n"
            "code = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests'], plugins=[m])\n"
            "print('MARKERS ' + json.dumps(m.dali))\n"
            "sys.exit(code)\n")
    r = _run(ALL_THREE, "-c", code, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    marked = json.loads(r.stdout.split("MARKERS ", 1)[1])
    dali = {name for name, has in marked.items() if has}
    other = set(marked) - dali
    assert len(other) > 100 and dali
    names = " ".join(dali)
    for test in ("test_streaming_run_exits_zero_with_flat_gpu_memory_over_twenty_evaluations",
                 "test_dali_mixed_decode_matches_the_cpu_decode", "test_a_damaged_sample_under_dali_mixed_decode_is_one_line",
                 "test_training_with_dali_alone", "test_twenty_steps_never_wait_for_the_device[default-dali]"):
        assert test in names, test
    assert not [t for t in other if "[dali" in t or "-dali]" in t or "dali_" in t.split("::")[-1][:10]], other
