"""launch/gpu_check.sh cannot rot: its phases run at toy sizes here (on a CPU, or on a GPU
machine at toy sizes too), write their JSON summaries, and a bad phase name is one line."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, needs_loader


def _check(tmp_path, *args, timeout=900):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "VAE_DIST_WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "VAE_DIST_SITE": str(tmp_path / "site")}
    return subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path)


@needs_loader
@pytest.mark.skipif(bool(os.environ.get("VAE_DIST_IN_GPU_CHECK")), reason="run by gpu_check itself: the real phases run")
def test_smoke_runs_every_phase_and_writes_its_summary(tmp_path):
    r = _check(tmp_path, "--smoke", "smoke")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "gpu_check: 4 of 4 phases ok" in r.stdout
    out = tmp_path / "out"
    phases = {name: json.loads((out / f"{name}.json").read_text()) for name in ("env", "tests", "bench", "tin20")}
    assert all(p["ok"] and p["smoke"] and p["label"] == "smoke" for p in phases.values())
    assert len(list(out.iterdir())) <= 16  # two calls' worth of what the device tool brings back (8 per call)

    env = phases["env"]["results"]
    assert env["torch"] and "missing_optional" in env and env["cuda_available"] == (env["gpus"] > 0)
    tests = phases["tests"]["results"]
    assert tests["suite"]["passed"] > 5 and tests["suite"]["failures"] == 0
    assert tests["gpu_tests"]["tests"] == 1  # skipped on a CPU, run on a GPU
    bench = phases["bench"]["results"]
    assert set(bench["targets"]) == {"e2e_cache_large_bf16", "e2e_b64", "e2e_vs_seed_b64", "dali_mixed_decode"}
    assert bench["compiled_rows"]["rows"] >= 1 and bench["compiled_rows"]["not_really_compiled"] == []
    for name in ("data", "step", "e2e"):  # the DESIGN.md report, merged over the phase's runs
        report = json.loads((out / f"{name}.json").read_text())
        assert report["env"]["torch"] and any("img_per_s" in row for row in report["results"]), name
    tin = phases["tin20"]["results"]
    train = tin["train"]
    assert train["status"] == "ok" and train["steps"] == train["total_steps"] > 0
    assert train["startup_s"] > 0 and train["train_s"] > 0 and train["img_per_s"] > 0
    assert train["final_val"]["psnr"] > 5 and train["final_val"]["bpd"] > 0
    assert tin["seed"]["img_per_s"] > 0 and "extrapolated" in tin["seed"]["note"] and tin["speedup_vs_seed"] > 0
    assert (out / "tin20-metrics.jsonl").is_file() and (out / "tin20.log").stat().st_size > 0


def test_a_bad_phase_is_one_line_and_a_failing_part_is_recorded(tmp_path):
    r = _check(tmp_path, "cpu", "warp")
    assert r.returncode == 2 and r.stderr.strip() == \
        "gpu_check: unknown phase warp (choose from env, tests, bench, tin20)", r.stderr
    env = {**os.environ, "OUT": str(tmp_path / "o2")}
    code = ("import sys; sys.path.insert(0, 'launch'); import gpu_check as g; from pathlib import Path; "
            "out = Path(sys.argv[1]); stale = out / 'stale.json'; stale.write_text('{}'); "
            "p = g.Phase('env', out, 'x', True); "
            "p.run('boom', [sys.executable, '-c', 'raise SystemExit(3)'], 60, outputs=(stale,)); "
            "p.run('slow', [sys.executable, '-c', 'import time; time.sleep(60)'], 1); p.finish(); "
            "late = g.Phase('tests', out, 'x', True, g.Deadline(40)); "
            "late.run('too late', [sys.executable, '-c', 'pass'], 60); late.finish()")
    (tmp_path / "o2").mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o2")], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    parts = json.loads((tmp_path / "o2" / "env.json").read_text())["parts"]
    assert [(p["part"], p["status"]) for p in parts] == [("boom", "failed"), ("slow", "timeout")]
    assert parts[0]["rc"] == 3 and not (tmp_path / "o2" / "stale.json").exists()  # nothing stale passes for new
    (late,) = json.loads((tmp_path / "o2" / "tests.json").read_text())["parts"]
    assert late["status"] == "skipped" and late["why"].startswith("no time left in this call")
