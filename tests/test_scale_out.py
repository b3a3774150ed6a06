"""Scale-out knobs under 2 real gloo processes: DDP's comm hooks (compressed gradients on the
wire) and gradient accumulation (train.grad_accum_steps, no all-reduce on the micro-batches).
docs/scaling.md says what they are for."""

import json
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from vae_dist.model import VAE, VAEConfig

from .conftest import ROOT, TINY_MODEL, accelerate_launch, launch_command, library_warnings, needs_loader

pytestmark = needs_loader

# one optimizer step = 16 images per process either way; the RAM cache without flips hands both
# layouts the same images in the same order
EXACT = [*TINY_MODEL, "--data.cache=ram", "--data.flip=false", "--data.num_threads=1", "--log.wandb_mode=disabled",
         "--log.image_every=1000", "--train.eval_every=0", "--train.precision=no", "--model.channels_last=false",
         "--log.log_every=1", "--optim.lr=3e-3"]


def _allreduces(run, rank=0) -> int:
    """c10d all-reduce calls in a rank's torch.profiler trace of the profiled steps (DDP's
    gradient buckets: the steps hold no sync point, so nothing else all-reduces there)."""
    (trace,) = (run / "profile").glob(f"*_rank{rank}.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    return sum(e.get("name") == "c10d::allreduce_" for e in events)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["bf16", "fp16"])  # powersgd: refused on gloo (below), tests/test_gpu.py on NCCL
def test_each_comm_hook_trains_and_the_replicas_stay_identical(shards, tmp_path, hook):
    out = tmp_path / "replicas.json"
    cmd = [*launch_command(2, str(ROOT / "tests" / "ddp_replicas.py")), str(shards), str(tmp_path / "run"), str(out),
           "--model.compile=false", "--data.cache=ram", "--data.num_threads=1",
           f"--train.ddp_comm_hook={hook}", "--train.max_steps=24", "--log.log_every=2",
           "--optim.lr=3e-3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert library_warnings(r.stderr) == [], r.stderr
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["steps"] == 24 and result["comm_hook"] == hook
    assert result["moved"] > 1e-3  # it trained
    assert result["max_abs_difference"] == 0.0, result  # every rank applied the same update
    assert f"comm_hook={hook}" in r.stdout
    rows = [row for row in _rows(tmp_path / "run") if "split" not in row]
    assert sum(x["loss"] for x in rows[-3:]) < sum(x["loss"] for x in rows[:3])  # the loss goes down


@pytest.mark.slow
def test_accumulation_matches_the_doubled_batch_all_reduces_once_a_step_and_resumes_exactly(shards, tmp_path):
    """2 processes x 2 micro-batches of 8 is, step for step, 2 processes x batch 16 (the same
    images, the mean of the two micro-batch gradients is the batch's), and each optimizer step
    all-reduces the gradient buckets once, not once per micro-batch. Checkpoints and agreed stops
    fall on optimizer steps: 3 steps, a checkpoint, 3 more from it give the weights of the 6
    steps in one go, bit for bit."""
    base = ["train", f"--data.shards={shards}", *EXACT, "--train.checkpoint_every=3",
            "--loss.kl_schedule=constant"]  # the same beta whatever max_steps (the linear warm-up spans the run)
    accum = [*base, "--train.batch_size=8", "--train.grad_accum_steps=2"]
    profiled = ["--train.profile_steps=1,3", "--train.max_steps=6"]  # the profiler changes no number
    whole, doubled, halves = tmp_path / "accum", tmp_path / "doubled", tmp_path / "halves"
    r = accelerate_launch(2, *accum, f"--train.out_dir={whole}", *profiled)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # issue 44, item 6: two fresh processes profiled on a CPU: none of kineto's no-GPU or USDT lines
    assert "gpuGetDeviceCount" not in r.stderr and "USDT:" not in r.stderr, r.stderr[-3000:]
    assert "batch_per_process=8, grad_accum_steps=2, global_batch=32" in r.stdout
    r = accelerate_launch(2, *base, f"--train.out_dir={doubled}", *profiled, "--train.batch_size=16")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = _rows(whole), _rows(doubled)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4, 5, 6, 6]  # 6 steps, then the final eval
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert all(x["img_per_s"] > 0 for x in a if "split" not in x)
    wa, wb = load_file(str(whole / "model.safetensors")), load_file(str(doubled / "model.safetensors"))
    torch.manual_seed(0)  # the trainer's init for train.seed=0
    w0 = VAE(VAEConfig(widths=(8, 16, 16, 32), latent_dim=8)).state_dict()
    da = torch.cat([(wa[k] - w0[k]).flatten() for k in w0])
    db = torch.cat([(wb[k] - w0[k]).flatten() for k in w0])
    # the same updates up to float rounding (summing two half-batch gradients rounds otherwise)
    assert db.norm() > 1e-3 and (da - db).norm() / db.norm() < 1e-4, float((da - db).norm() / db.norm())
    # two profiled steps: the same bucket all-reduces per optimizer step with and without accumulation
    assert _allreduces(whole) == _allreduces(doubled) > 0
    assert _allreduces(whole, rank=1) == _allreduces(whole)

    r = accelerate_launch(2, *accum, f"--train.out_dir={halves}", "--train.max_steps=3", "--log.log_every=3")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    state = json.loads((halves / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["batch_in_epoch"] == 3 and state["batch_size"] == 16  # 2 x 8 per step
    r = accelerate_launch(2, *accum, f"--train.out_dir={halves}", "--train.max_steps=6", "--log.log_every=3")
    assert r.returncode == 0 and "at step 3" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    wh = load_file(str(halves / "model.safetensors"))
    assert all(torch.equal(wa[k], wh[k]) for k in wa)
    assert [x["step"] for x in _rows(halves) if "split" not in x] == [3, 6]


@pytest.mark.slow
def test_powersgd_on_gloo_is_refused_on_every_rank_in_one_line(shards, tmp_path):
    """check_comm_hook runs on every rank alike (a collective probe for the wire dtypes), after
    the start is decided and before the folder is claimed: one line for the run, nothing written.
    PowerSGD chains each bucket's all-reduces through callbacks on gloo's threads: with the seed's
    3 buckets the ranks issued them in different orders and gloo aborted (bench comm, measured)."""
    run = tmp_path / "run"
    r = accelerate_launch(2, "train", f"--data.shards={shards}", f"--train.out_dir={run}", *EXACT,
                          "--train.max_steps=2", "--train.ddp_comm_hook=powersgd")
    errors = [line for line in r.stderr.splitlines() if line.startswith("vae-dist: error:")]
    assert r.returncode != 0 and len(errors) == 1 and "train.ddp_comm_hook=powersgd on gloo" in errors[0], \
        r.stderr[-3000:]
    assert not run.exists()


@pytest.mark.parametrize("overrides, error", [
    (["--train.ddp_static_graph=true", "--train.grad_accum_steps=2"],
     "train.ddp_static_graph=true cannot run with train.grad_accum_steps=2"),
    (["--train.global_batch_size=20", "--train.grad_accum_steps=4"],
     "train.global_batch_size=20 does not divide by 2 processes x 4 accumulation steps: make it a multiple of 8"),
    (["--model.compile=true", "--model.compile_mode=max-autotune"], "model.compile_mode=max-autotune with 2 processes"),
])
def test_what_two_processes_cannot_run_is_refused_by_the_early_checks(overrides, error):
    """The checks `refuse_early` makes on rank 0 before the run folder is claimed, for a world of
    two, in this process; how a refusal reaches both ranks as one line with nothing written is
    tests/test_train.py's two-process launch (test_a_refused_start_under_two_processes...)."""
    from vae_dist.config import build_config, per_process_batch
    from vae_dist.distributed import check_ddp_knobs
    from vae_dist.errors import ConfigError
    from vae_dist.step import compile_mode_for

    cfg = build_config(None, overrides)
    with pytest.raises(ConfigError, match=re.escape(error)):
        per_process_batch(cfg.train, 2)
        check_ddp_knobs(cfg.train)
        compile_mode_for(cfg.model, torch.device("cpu"), 2)
