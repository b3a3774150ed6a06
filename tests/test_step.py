"""The training step never waits for the device: counted host syncs, device-side skips, no recompiles."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vae_dist.config import build_config
from vae_dist.train import StopSignal, Trainer

from .conftest import TINY_MODEL, needs_dali, needs_loader, with_loader

pytestmark = needs_loader

VAE_DIST = str(Path(__file__).resolve().parents[1] / "vae_dist")
# the Tensor methods that read a device value on the host (each drains the CUDA queue)
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


def _trainer(shards, tmp_path, *extra) -> Trainer:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per test
    cfg = build_config(None, [f"--data.shards={shards}", f"--train.out_dir={tmp_path / 'run'}", *TINY_MODEL,
                              "--train.batch_size=16", "--data.num_threads=1", "--log.wandb_mode=disabled",
                              "--train.eval_every=0", "--train.checkpoint_every=0", "--log.image_every=1000",
                              "--model.compile=false", *extra])
    return Trainer(cfg)


def test_no_host_sync_between_log_points(shards, tmp_path, monkeypatch):
    trainer = _trainer(shards, tmp_path, "--log.log_every=5", "--train.max_steps=10", "--optim.grad_clip=1.0",
                       "--optim.lr_schedule=cosine", "--optim.warmup_steps=3")
    syncs = []

    def counting(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(VAE_DIST):
                syncs.append((trainer.state.step, name, f"{Path(caller).name}:{sys._getframe(1).f_lineno}"))
            return original(self, *args, **kwargs)
        return method

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    assert trainer.fit() == 0
    monkeypatch.undo()
    assert syncs, "the counter saw nothing: it is not counting"  # the log points and the end do read
    between = [s for s in syncs if s[0] % 5]
    assert between == [], between
    assert {s[0] for s in syncs} <= {5, 10}, [s for s in syncs if s[0] not in (5, 10)]


def _snapshot(trainer):
    params = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    opt = trainer.step.raw_optimizer.state_dict()["state"]
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.items()}
    return params, state


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def assert_nan_step_changes_nothing(trainer, good: torch.Tensor) -> dict:
    """One step on `good` with a NaN in it: weights and Adam's state (moments, step count)
    stay bit-identical. Returns the weights, for the caller to check that training goes on."""
    params, opt = _snapshot(trainer)
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    trainer.train_step(bad)
    params_after, opt_after = _snapshot(trainer)
    assert _same(params, params_after), "a non-finite step changed the weights"
    assert all(_same(opt[i], opt_after[i]) for i in opt), "a non-finite step changed Adam's state (moments, step)"
    return params


def test_nonfinite_batch_is_skipped_on_the_device_and_counted_at_the_next_log(shards, tmp_path):
    trainer = _trainer(shards, tmp_path, "--log.log_every=3", "--train.max_steps=100")
    good = next(trainer.train_loader.epoch(0))[0].float() / 255  # float: a NaN needs a float batch
    trainer.train_step(good)
    params = assert_nan_step_changes_nothing(trainer, good)
    trainer.train_step(good)
    assert not _same(params, _snapshot(trainer)[0]), "the next good batch did not train"

    stop = StopSignal()
    try:
        trainer.maybe_sync(stop)  # step 3: a log point
    finally:
        stop.restore()
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 3 and row["skipped_steps"] == 1
    assert row["loss"] == row["loss"]  # the mean over the two good steps is not NaN
    assert trainer.state.bad_steps == 0 and trainer.state.skipped_steps == 1


def test_max_bad_steps_stops_at_the_next_sync_point(shards, tmp_path):
    from vae_dist.metrics import DivergedError

    trainer = _trainer(shards, tmp_path, "--log.log_every=4", "--train.max_bad_steps=3", "--train.max_steps=100")
    bad = torch.full_like(next(trainer.train_loader.epoch(0))[0], float("nan"), dtype=torch.float32)
    stop = StopSignal()
    try:
        for _ in range(3):
            trainer.train_step(bad)
            trainer.maybe_sync(stop)  # steps 1-3: not a sync point, nothing raised yet
        trainer.train_step(next(trainer.train_loader.epoch(0))[0])  # a good step ends the run of bad ones
        with pytest.raises(DivergedError, match="3 non-finite steps in a row by step 4"):
            trainer.maybe_sync(stop)
    finally:
        stop.restore()


def test_changing_lr_and_beta_does_not_recompile(shards, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    trainer = _trainer(shards, tmp_path, "--model.compile=true", "--log.log_every=1000", "--train.max_steps=100",
                       "--optim.lr_schedule=cosine", "--optim.warmup_steps=10", "--loss.kl_warmup=0.5")
    batches = trainer.train_loader.epoch(0)
    for _ in range(2):  # the first compiles
        trainer.train_step(next(batches)[0])
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    assert graphs > 0, "nothing was compiled"
    lrs, betas = set(), set()
    for _ in range(5):
        trainer.train_step(next(batches)[0])
        lrs.add(trainer.step.lrs[0].item())
        betas.add(trainer.step.beta.item())
    assert len(lrs) == 5 and len(betas) == 5  # both really changed every step
    assert counters["stats"]["unique_graphs"] == graphs and counters["frames"]["total"] == frames


def test_checkpoint_without_channels_last_resumes_with_it_and_moments_follow_the_params(shards, tmp_path):
    """Every CPU checkpoint is written in the default layout; CUDA trains channels_last. Fused
    Adam wants each moment laid out like its parameter, and load_state_dict keeps saved strides."""
    first = _trainer(shards, tmp_path, "--train.max_steps=2", "--log.log_every=2", "--model.channels_last=false")
    assert first.fit() == 0
    from vae_dist.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "run")
    again = _trainer(shards, tmp_path, "--train.max_steps=4", "--log.log_every=2", "--model.channels_last=true")
    again.resume(ckpt)
    opt = again.step.raw_optimizer
    four_d = [p for p in again.raw_model.parameters() if p.dim() == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    for p in four_d:
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].stride() == p.stride(), (key, opt.state[p][key].stride(), p.stride())
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert any(torch.equal(saved[i]["exp_avg"], s["exp_avg"]) for i, s in enumerate(opt.state_dict()["state"].values()))
    batches = again.train_loader.epoch(again.state.epoch, skip=again.state.batch_in_epoch)
    again.train_step(next(batches)[0])  # and it trains on
    assert again.state.step == 3


def test_train_rows_carry_model_flops_and_mfu_against_the_configured_peak(shards, tmp_path):
    trainer = _trainer(shards, tmp_path, "--train.max_steps=4", "--log.log_every=2", "--log.peak_tflops=0.5")
    assert trainer.fit() == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r]
    assert len(train_rows) == 2
    for row in train_rows:
        assert row["tflop_per_s"] == pytest.approx(row["img_per_s"] * trainer.window.flops_per_image / 1e12)
        assert row["mfu"] == pytest.approx(row["tflop_per_s"] / 0.5) and row["mfu"] > 0
    trainer = _trainer(shards, tmp_path / "b", "--train.max_steps=2", "--log.log_every=2")
    if not torch.cuda.is_available():
        assert trainer.window.peak_flops is None  # a CPU: no known peak, no mfu
    assert trainer.window.flops_per_image > 0


def test_profile_steps_writes_a_trace_and_says_what_bounds_the_step(shards, tmp_path):
    trainer = _trainer(shards, tmp_path, "--train.max_steps=6", "--log.log_every=3", "--train.profile_steps=1,3")
    assert trainer.fit() == 0
    prof = tmp_path / "run" / "profile"
    (trace,) = prof.glob("*.trace.json")
    assert trace.name == "steps_1-3_rank0.trace.json" and trace.stat().st_size > 1000
    summary = json.loads((prof / "steps_1-3_rank0.summary.json").read_text())
    assert summary["steps"] == 2 and summary["aten_ops_per_step"] > 50 and summary["bound_by"]
    if torch.cuda.is_available():
        assert summary["launches_per_step"] > 0 and summary["kernel_ms_per_step"] > 0
    else:
        assert summary["bound_by"].startswith("host")
    assert json.loads(trace.read_text())["traceEvents"]



def test_the_profiler_drops_kineto_s_no_gpu_and_usdt_lines_and_nothing_else(monkeypatch):
    # issue 44, item 6: what libkineto writes to fd 2 from C++ while the profiler starts and stops:
    # its "no GPU driver" ERROR on a CPU run and its USDT markers go, any other line stays (a fresh
    # process's whole stderr: tests/test_scale_out.py's profiled launch)
    import os
    import tempfile

    from vae_dist.profiling import _without_kineto_noise

    from .in_process import process_like

    no_gpu = "ERROR:2026-12-05 02:17:16 18092:18092 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n"
    usdt = "USDT:2026-12-05 02:17:16 18092:18092 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
    real = "ERROR:2026-12-05 02:17:16 18092:18092 CuptiActivityApi.cpp:10] CUPTI could not start\n"
    lines = (no_gpu, usdt, real, "a line without a newline")
    for cuda in (False, True):
        with process_like({}) as texts:
            with _without_kineto_noise(cuda):
                for line in lines:
                    os.write(2, line.encode())
        # issue 44 review, finding 9: a CUDA run's stderr is not filtered at all (kept as it comes)
        kept = lines if cuda else (real, "a line without a newline")
        assert texts[1] == "".join(kept), (cuda, texts[1])

    # issue 44 review, finding 9: no temporary file to be had, or fd 2 closed: the block runs unfiltered
    with process_like({}) as texts:
        monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/tmp")
        with _without_kineto_noise(False):
            os.write(2, usdt.encode())
        monkeypatch.undo()
    assert texts[1] == usdt
    with process_like({}):
        os.close(2)
        with _without_kineto_noise(False):
            ran = True
    assert ran


@needs_dali
def test_dali_val_pipeline_is_built_once_for_many_evaluations_and_released_at_the_end(shards, tmp_path):
    trainer = _trainer(shards, tmp_path, "--train.max_steps=24", "--log.log_every=4", "--train.eval_every=4",
                       "--data.loader=dali", "--data.cache=none")
    val = trainer.val_loader.loader
    evals = []
    original = trainer.evaluator.evaluate
    trainer.evaluator.evaluate = lambda state: evals.append(original(state))
    assert trainer.fit() == 0
    done = [e for e in evals if e is not None]
    assert len(done) >= 6 and all(e["images"] == 60 for e in done)
    assert val.builds == 1, f"the val pipeline was built {val.builds} times for {len(done)} evaluations"
    assert val._it is None and trainer.train_loader.loader._it is None  # closed before the process ends


@pytest.mark.parametrize("compile", [False, True])
def test_grad_clip_scales_the_gradients_the_optimizer_sees(shards, tmp_path, compile):
    """Adam ignores a common gradient scale, but not with a huge eps: then its step is
    proportional to the (clipped) gradient, and a tight clip must shrink the update."""
    moved = {}
    for clip in (0.0, 1e-3):
        torch._dynamo.reset()
        trainer = _trainer(shards, tmp_path / f"c{clip}", f"--optim.grad_clip={clip}", "--optim.eps=1e4",
                           "--optim.lr=1.0", "--train.max_steps=10", f"--model.compile={str(compile).lower()}")
        before = [p.detach().clone() for p in trainer.raw_model.parameters()]
        trainer.train_step(next(trainer.train_loader.epoch(0))[0])
        moved[clip] = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.raw_model.parameters(), before)]).norm()
    assert moved[0.0] > 0 and moved[1e-3] < 0.1 * moved[0.0], moved


def _train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


@pytest.mark.parametrize("loader", with_loader("webdataset", "dali"))
def test_mid_epoch_resume_continues_exactly_with_every_streaming_loader(shards, tmp_path, loader):
    """An unbroken run and one resumed from its mid-epoch checkpoint take the same steps: the
    same batches, flips and reparameterization noise (the loader must not draw on the torch
    RNG that checkpoints restore). 12 steps per epoch: 16 steps cross an epoch start."""
    common = (f"--data.loader={loader}", "--data.cache=none", "--train.max_steps=16", "--log.log_every=1")
    whole = _trainer(shards, tmp_path / "whole", *common, "--train.checkpoint_every=5", "--train.keep_last=9")
    assert whole.fit() == 0
    resumed = _trainer(shards, tmp_path / "resumed", *common)
    from vae_dist.checkpoint import checkpoint_dir

    assert resumed.fit(checkpoint_dir(tmp_path / "whole" / "run") / "step_0000005") == 0
    a, b = _train_rows(tmp_path / "whole" / "run"), _train_rows(tmp_path / "resumed" / "run")
    assert [r["step"] for r in b] == list(range(6, 17))
    assert [r["loss"] for r in b] == [r["loss"] for r in a[5:]]  # exactly


def test_free_bits_rows_log_the_real_kl_and_the_clamped_one_apart(shards, tmp_path):
    trainer = _trainer(shards, tmp_path, "--loss.free_bits=20", "--train.max_steps=2", "--log.log_every=2",
                       "--loss.kl_schedule=constant")
    assert trainer.fit() == 0
    (row,) = _train_rows(tmp_path / "run")
    latent = trainer.raw_model.cfg.latent_dim
    assert row["kl_objective"] == pytest.approx(20 * latent)  # every dim under the budget: clamped
    assert 0 < row["kl"] < 20 * latent  # the real KL, which the val rows' elbo_nats uses
    assert "elbo" not in row  # issue 44, item 3: the ELBO is the val rows' elbo_nats alone
    assert row["loss"] == pytest.approx(row["recon"] + row["kl_objective"], rel=1e-5)  # beta = 1


@pytest.mark.parametrize("verify", ["false", "true"])
def test_a_run_reads_manifest_json_once(shards, tmp_path, monkeypatch, verify):
    """The shard set is opened once per process (train's ShardSet) and handed to the loaders,
    the cache decision, the hooks and data.verify: every open of manifest.json is counted."""
    import builtins
    import io
    import os
    import traceback

    from accelerate.state import AcceleratorState

    from vae_dist.train import train

    real_open, reads = io.open, []

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "manifest.json":
            reads.append("".join(traceback.format_stack(limit=6)))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_text opens through io.open
    monkeypatch.setattr(builtins, "open", counting_open)
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = build_config(None, [f"--data.shards={shards}", f"--train.out_dir={tmp_path / 'run'}", *TINY_MODEL,
                              "--train.batch_size=16", "--data.num_threads=1", "--log.wandb_mode=disabled",
                              "--train.max_steps=4", "--train.eval_every=2", "--train.checkpoint_every=2",
                              "--log.log_every=2", "--log.image_every=2", "--model.compile=false",
                              f"--data.verify={verify}"])
    assert train(cfg) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "val"] == [2, 4]  # steps, evals, pictures all ran
    assert (tmp_path / "run" / "images").is_dir()
    assert len(reads) == 1, "manifest.json was opened more than once:\n" + "\n---\n".join(reads)


@pytest.mark.parametrize("device, world, accum, precision, mode, why", [
    ("cpu", 1, 1, "no", "default", "training does not run on a CUDA GPU"),
    ("cuda", 2, 1, "bf16", "default", "2 processes"),
    ("cuda", 1, 2, "bf16", "default", "train.grad_accum_steps=2"),
    ("cuda", 1, 1, "fp16", "default", "fp16's GradScaler"),
    ("cuda", 1, 1, "bf16", "reduce-overhead", "model.compile_mode=reduce-overhead"),
])
def test_a_whole_step_cuda_graph_is_refused_where_it_cannot_run(device, world, accum, precision, mode, why):
    from vae_dist.errors import ConfigError
    from vae_dist.step import check_cuda_graph

    with pytest.raises(ConfigError, match="^train.cuda_graph=true but ") as e:
        check_cuda_graph(True, torch.device(device), world, accum, precision, mode)
    assert why in str(e.value)
    check_cuda_graph(False, torch.device(device), world, accum, precision, mode)  # off: nothing to refuse
    check_cuda_graph(True, torch.device("cuda"), 1, 1, "bf16", "default")  # where it runs


def test_train_with_a_cuda_graph_on_a_cpu_is_one_line_and_writes_nothing(shards, tmp_path):
    from .conftest import run_cli

    run = tmp_path / "run"
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *TINY_MODEL, "--train.cuda_graph=true",
                "--log.wandb_mode=disabled", "--train.max_steps=2", env={"CUDA_VISIBLE_DEVICES": ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == ["vae-dist: error: train.cuda_graph=true but training does not run on a "
                                           "CUDA GPU"], r.stderr[-2000:]
    assert not run.exists()
