"""What only a CUDA GPU can show (`pytest -m gpu`); every test skips with the reason elsewhere.

- DALI mixed decode: the same order, labels and pixels (within 2/255) as DALI's CPU decode.
- A non-finite batch under bf16, fp16 and fp32 leaves weights and Adam's state bit-identical.
- 20 steps of the real step never wait for the device (`torch.cuda.set_sync_debug_mode`).
- Compiled bf16 channels_last: no recompiles as lr and beta change, loss close to eager.
- A CPU checkpoint resumes on CUDA (layouts differ); a streaming run exits 0, memory flat.
- Every compiled bench row really compiled; on 2+ GPUs, DDP replicas stay identical.
- A damaged JPEG under mixed decode is the same one line as on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

from vae_dist.step import GOOD, LOSS
from vae_dist.train import StopSignal

from .conftest import (
    CPU_ONLY,
    CUDA,
    HAVE_DALI,
    ROOT,
    TINY_MODEL,
    _free_port,
    needs_dali,
    needs_loader,
    run_cli,
)
from .test_step import _same, _snapshot, assert_nan_step_changes_nothing  # one check, on the CPU and the GPU

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]
GPUS = torch.cuda.device_count() if CUDA else 0
COMMON = [*TINY_MODEL, "--train.batch_size=8", "--data.num_threads=2", "--log.wandb_mode=disabled",
          "--log.image_every=100000"]


@contextlib.contextmanager
def no_host_sync():
    """Any host-device sync that PyTorch makes in here raises (cudaStreamSynchronize, .item(),
    blocking copies)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _trainer(shards, tmp_path, *extra):
    from accelerate.state import AcceleratorState

    from vae_dist.config import build_config
    from vae_dist.train import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()
    cfg = build_config(None, [f"--data.shards={shards}", f"--train.out_dir={tmp_path / 'run'}", *COMMON,
                              "--train.eval_every=0", "--train.checkpoint_every=0", "--log.log_every=100000",
                              "--train.max_steps=100000", *extra])
    return Trainer(cfg)


# -- data --------------------------------------------------------------------------------------

@needs_dali
@pytest.mark.parametrize("train", [False, True])
def test_dali_mixed_decode_matches_the_cpu_decode(shards, train):
    from vae_dist.config import DataConfig
    from vae_dist.data.loaders import build_loader
    from vae_dist.data.shards import ShardSet

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    out = {}
    for decode, device in (("gpu", gpu), ("cpu", cpu)):
        cfg = DataConfig(shards=str(shards), loader="dali", decode=decode, num_threads=2)
        loader = build_loader(ShardSet.open(cfg.shards), cfg, "train" if train else "val", 16, rank=0, world=1,
                              device=device, train=train, seed=3)
        batches = list(loader.epoch(1))  # all held at once: a reused output buffer would show below
        loader.close()
        assert all(x.device == device and x.dtype == torch.uint8 for x, _ in batches)
        out[decode] = (torch.cat([x.cpu() for x, _ in batches]), torch.cat([y.cpu() for _, y in batches]))
    (xg, yg), (xc, yc) = out["gpu"], out["cpu"]
    assert torch.equal(yg, yc)  # the same samples in the same order (and, for train, the same flips)
    diff = (xg.int() - xc.int()).abs().float()
    # nvJPEG's IDCT and chroma upsampling are not libjpeg's: close on average, rarely far apart
    assert diff.mean() < 2, f"mean |gpu - cpu| = {diff.mean():.2f} levels (max {diff.max():.0f})"
    assert (diff > 8).float().mean() < 0.01, f"{(diff > 8).float().mean():.2%} of subpixels differ by more than 8"


def test_gpu_cache_serves_each_train_sample_once_per_epoch(shards, tmp_path):
    from vae_dist.data.loaders import CachedLoader

    trainer = _trainer(shards, tmp_path, "--data.cache=gpu")
    cached = trainer.train_loader.loader  # the CachedLoader behind the device wrapper
    assert trainer.cache == "gpu" and cached.images.device.type == "cuda" and cached.images.dtype == torch.uint8
    n = cached.images.shape[0]
    by_id = CachedLoader(cached.images, torch.arange(n, device=cached.images.device), 8, train=True, seed=0)
    orders = []
    for epoch in (0, 1):
        seen = torch.cat([y for x, y in by_id.epoch(epoch)]).cpu().tolist()
        assert len(seen) == len(set(seen)) == by_id.steps_per_epoch * 8 > n - 8  # each sample at most once
        orders.append(seen)
    assert orders[0] != orders[1]


# -- the step ------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_nonfinite_batch_leaves_weights_and_adam_state_bit_identical(shards, tmp_path, precision):
    trainer = _trainer(shards, tmp_path, f"--train.precision={precision}", "--data.cache=gpu")
    good = next(trainer.train_loader.epoch(0))[0].float() / 255
    for _ in range(3):
        trainer.train_step(good)
    params = assert_nan_step_changes_nothing(trainer, good)
    for _ in range(5):  # fp16: the scaler may skip a few while it finds its scale
        trainer.train_step(good)
    assert not _same(params, _snapshot(trainer)[0]), "good batches did not train"


@pytest.mark.parametrize("data", ["cache", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_twenty_steps_never_wait_for_the_device(shards, tmp_path, data, mode):
    extra = ["--data.cache=gpu"] if data == "cache" else ["--data.cache=none", "--data.loader=dali",
                                                          "--data.decode=gpu"]
    trainer = _trainer(shards, tmp_path, "--model.compile=true", f"--model.compile_mode={mode}", *extra)
    try:
        batches = trainer.train_loader.epoch(0)
        for _ in range(3):  # compiles (and records the CUDA graphs)
            trainer.train_step(next(batches)[0])
        stop = StopSignal()
        try:
            for _ in range(20):
                x = next(batches)[0]  # the loader's own waits are not the step's
                with no_host_sync():  # the loop's body between two sync points, as run_epoch runs it
                    trainer.train_step(x)
                    trainer.maybe_sync(stop)
                    trainer.maybe_eval()
                    trainer.maybe_checkpoint()
                    trainer.hooks.maybe_images(trainer.state.step, trainer.raw_model)
        finally:
            stop.restore()
        torch.cuda.synchronize()
        loss_sum, good = trainer.step.meters[LOSS].item(), trainer.step.meters[GOOD].item()
        assert good == 23 and loss_sum == loss_sum
    finally:
        trainer.close_loaders()  # DALI's pipeline while CUDA is up, also when an assert failed


def test_compiled_bf16_channels_last_does_not_recompile_and_matches_eager(shards, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    # inductor draws its own random numbers unless told to use eager's: the same noise for both
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    trainer = _trainer(shards, tmp_path, "--model.compile=true", "--train.precision=bf16",
                       "--model.channels_last=true", "--data.cache=gpu", "--optim.lr_schedule=cosine",
                       "--optim.warmup_steps=10", "--loss.kl_warmup=0.5", "--train.max_steps=100")
    x = next(trainer.train_loader.epoch(0))[0]
    trainer.step.beta.fill_(0.5)
    torch.manual_seed(0)
    eager = trainer.step._forward_loss(x, trainer.step.beta)[0].float()
    torch.manual_seed(0)
    compiled = trainer.step.forward_loss(x, trainer.step.beta)[0].float()
    assert compiled.item() == pytest.approx(eager.item(), rel=2e-2)
    batches = trainer.train_loader.epoch(0)
    for _ in range(2):
        trainer.train_step(next(batches)[0])
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    for _ in range(5):
        trainer.train_step(next(batches)[0])
    assert counters["stats"]["unique_graphs"] == graphs and counters["frames"]["total"] == frames


def test_a_whole_step_cuda_graph_starts_fresh_trains_skips_nonfinite_and_never_waits(shards, tmp_path):
    """train.cuda_graph: the capture's warm-up is undone (two uncaptured steps first, as a resumed
    run brings: after the first graphed step Adam has counted three), replays update the live
    weights, a NaN batch leaves everything bit-identical, 20 replays make no host sync, and the
    loss falls."""
    trainer = _trainer(shards, tmp_path, "--train.cuda_graph=true", "--model.compile=true",
                       "--train.precision=bf16", "--data.cache=gpu")
    batches = trainer.train_loader.epoch(0)
    good = next(batches)[0].float() / 255  # float batches: the static input can then hold a NaN
    for _ in range(2):
        trainer.step.step(good, 1e-3, 0.0)  # the TrainStep inside, uncaptured: an optimizer state to keep
    before = _snapshot(trainer)[0]
    trainer.train_step(good)  # captures
    assert trainer.step.graph is not None
    state = trainer.step.raw_optimizer.state
    assert {int(s["step"].item()) for s in state.values()} == {3}, "the warm-up's steps were not undone"
    assert not _same(before, _snapshot(trainer)[0])
    window = trainer.step.take_meters()  # the three steps so far; zeroed in place, as the graph reads them
    assert window[GOOD].item() == 3
    first = window[LOSS].item() / 3
    assert_nan_step_changes_nothing(trainer, good)
    with no_host_sync():
        for _ in range(20):
            trainer.train_step(good)
    torch.cuda.synchronize()
    meters = trainer.step.take_meters()
    assert meters[GOOD].item() == 20 and meters[LOSS].item() / 20 < first


# -- whole runs ----------------------------------------------------------------------------------

def test_a_cpu_checkpoint_resumes_on_cuda(shards, tmp_path):
    """Written on the CPU (fp32, default layout), resumed on the GPU (bf16, channels_last,
    fused Adam): the moments take their parameters' layout and training continues. Both from
    the caches (RAM, then GPU), which need no loader package."""
    run = tmp_path / "run"
    args = ["train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON, "--log.log_every=2"]
    r = run_cli(*args, "--train.max_steps=4", "--data.cache=ram", env=CPU_ONLY)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(*args, "--train.max_steps=8", "--data.cache=gpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout and "device=cuda" in r.stdout, r.stdout[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "split" not in row][-2:] == [6, 8]


@needs_dali
def test_streaming_run_exits_zero_with_flat_gpu_memory_over_twenty_evaluations(shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *COMMON, "--data.cache=none",
                "--data.loader=dali", "--data.decode=gpu", "--train.max_steps=40", "--train.eval_every=2",
                "--log.log_every=10")
    assert r.returncode == 0, f"exit {r.returncode}: " + r.stderr[-3000:]  # not SIGABRT in DALI's teardown
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(evals) >= 20
    used = [e["gpu_mem_used_gib"] for e in evals]
    assert used[-1] - used[2] < 0.0625, used  # 64 MiB: nothing grows per evaluation


@needs_dali
def test_a_damaged_sample_under_dali_mixed_decode_is_one_line(shards, tmp_path):
    """nvImageCodec's failure on the GPU becomes the same one line as on the CPU: split, shard, key."""
    from .test_recovery import _damage_a_jpeg

    bad, key = _damage_a_jpeg(shards, tmp_path / "bad", "train")
    r = run_cli("train", f"--data.shards={tmp_path / 'bad'}", f"--train.out_dir={tmp_path / 'run'}", *COMMON,
                "--data.loader=dali", "--data.decode=gpu", "--data.cache=none", "--train.max_steps=40")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith(f"vae-dist: error: train sample {key} in {bad} does not decode ("), last


def test_every_compiled_bench_row_really_compiled(tmp_path):
    out = tmp_path / "step.json"
    r = run_cli("bench", "step", "--tiny", "--compile", "on", "--channels-last", "on", "--dtypes", "bf16,fp32",
                "--batch-sizes", "64,256", "--repeats", "1", "--steps", "5", "--warmup", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    row_device = json.loads(out.read_text())["device"]
    assert len(rows) == 4 and all("img_per_s" in row for row in rows), rows
    for row in rows:
        assert row["compiled_graphs"] >= 2 and row["recompiles_while_timed"] == 0 and "note" not in row, row
        from vae_dist.flops import PEAK_FLOPS

        assert row.get("mfu", 0) > 0 or not any(k in row_device for k in PEAK_FLOPS), row


@needs_loader
@pytest.mark.skipif(GPUS < 2, reason=f"DDP on GPUs needs 2 or more, this machine has {GPUS}")
@pytest.mark.parametrize("hook", ["none", "bf16", "powersgd"])  # powersgd runs on NCCL only (refused on gloo)
def test_ddp_compile_bf16_keeps_the_replicas_identical(shards, tmp_path, hook):
    import subprocess

    out = tmp_path / "replicas.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "ddp_replicas.py"), str(shards),
           str(tmp_path / "run"), str(out), f"--train.ddp_comm_hook={hook}", "--train.powersgd_start=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["steps"] == 12 and result["comm_hook"] == hook and result["moved"] > 0
    assert result["max_abs_difference"] == 0.0, result


def test_the_gpu_tests_know_what_is_installed():
    """A guard for the skips above: on a GPU machine, say what is missing rather than pass quietly
    (a warning shows in pytest's summary even under -q)."""
    import warnings

    if not HAVE_DALI:
        warnings.warn(f"no NVIDIA DALI on this GPU machine ({torch.cuda.get_device_name()}): the DALI GPU tests "
                      "skipped; carry the dali-slim parts (docs/gpu_check.md: the DALI window)", stacklevel=1)
    if GPUS < 2:
        warnings.warn(f"{GPUS} GPU: the DDP replica test skipped", stacklevel=1)
    assert GPUS >= 1 and Path(ROOT / "tests" / "ddp_replicas.py").is_file()
