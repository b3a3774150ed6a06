"""Bits/dim a paper would accept: the discretized likelihood, the IW bound, eval/sample/encode."""

import json
import math

import numpy as np
import pytest
import torch

from vae_dist.losses import discretized_gaussian_log_likelihood

from .conftest import HAVE_LOADER, TINY_MODEL, needs_loader, run_cli


def _phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def test_discretized_likelihood_of_an_exact_decoder_matches_the_hand_count():
    """Decoder output = the data: interior levels get the mass of +-half a bin around their own
    centre, the edge levels 0 and 255 half a bin plus the whole tail."""
    sigma = 2 / 255
    x = torch.tensor([[[[0.0, 1.0, 128 / 255, 7 / 255]]]])  # 2 edge, 2 interior subpixels
    half = 0.5 / 255 / sigma
    expected = 2 * math.log(_phi(half)) + 2 * math.log(_phi(half) - _phi(-half))
    got = discretized_gaussian_log_likelihood(x, x, sigma)
    assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-9)


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64).view(256, 1) / 255
    for mean, sigma in ((0.3, 0.05), (0.0, 0.2), (1.2, 0.01), (0.5, 1e-4), (0.5, 30.0)):
        p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), sigma).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9), (mean, sigma)
    far = discretized_gaussian_log_likelihood(torch.zeros(1, 1), torch.ones(1, 1), 1e-3)
    assert math.isfinite(far.item()) and far.item() < -1e5  # far in the tail: finite, not -inf


@pytest.fixture(scope="module")
def tiny_run(shards, tmp_path_factory):
    if not HAVE_LOADER:
        pytest.skip(needs_loader.kwargs["reason"])
    run = tmp_path_factory.mktemp("lik") / "run"
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *TINY_MODEL, "--train.batch_size=16",
                "--data.num_threads=1", "--log.wandb_mode=disabled", "--train.max_steps=24", "--log.log_every=4",
                "--train.eval_every=12")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def test_val_rows_report_the_discretized_elbo_and_sigma(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"]
    assert val and all(1 < r["bpd"] < 9 and 0 < r["sigma"] < 1 for r in val), val
    # issue 44, item 3: one name for the bound: elbo_nats (as `vae-dist eval --json`), bpd the same bound
    for r in val:
        assert "elbo" not in r and r["bpd"] == pytest.approx(-r["elbo_nats"] / (3 * 64 * 64 * math.log(2)))
    assert [r["step"] for r in val] == [12, 24]
    # sigma is the root of the train MSE per subpixel (seed objective: sum) over the steps since
    # the previous evaluation: 13..24, the rows at 16, 20 and 24, of 4 steps each
    since = [r["recon"] for r in rows if "split" not in r and r["step"] > 12]
    assert len(since) == 3
    assert val[-1]["sigma"] == pytest.approx(math.sqrt(sum(since) / 3 / (3 * 64 * 64)), rel=1e-6)


def test_iw_bound_is_never_looser_than_the_elbo_and_tightens_with_k(tiny_run, shards):
    from accelerate.state import AcceleratorState

    from vae_dist.inference import evaluate_checkpoint

    results = {}
    for k in (1, 4, 32):
        AcceleratorState._reset_state(reset_partial_state=True)
        results[k] = evaluate_checkpoint(str(tiny_run), str(shards), iw=k, calib_images=200, seed=3)
    assert results[1]["iw_bpd"] == pytest.approx(results[1]["elbo_bpd"], abs=1e-9)  # K=1: the same number
    for k in (4, 32):
        assert results[k]["iw_bpd"] <= results[k]["elbo_bpd"]  # Jensen, same samples
    assert results[32]["iw_bpd"] < results[4]["iw_bpd"] < results[1]["iw_bpd"]
    assert all(r["images"] == 60 and r["sigma_source"].startswith("maximum likelihood") for r in results.values())


def test_eval_cli_writes_json_with_named_bounds(tiny_run, shards, tmp_path):
    out = tmp_path / "e.json"
    r = run_cli("eval", str(tiny_run / "model.safetensors"), "--shards", str(shards), "--iw", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"elbo_bpd", "iw_bpd", "iw_k", "psnr", "sigma", "sigma_source", "images", "split"} <= set(res)
    assert res["iw_k"] == 4 and res["images"] == 60 and res["split"] == "val"
    assert 1 < res["iw_bpd"] <= res["elbo_bpd"] < 9 and res["psnr"] > 5
    assert "ELBO" in r.stdout and "bits/dim" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--split", "test"], "split 'test' is not in"),
    (["--iw", "0"], "--iw must be at least 1"),
])
def test_eval_errors_are_one_line(tiny_run, shards, args, words):
    r = run_cli("eval", str(tiny_run), "--shards", str(shards), *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr[-2000:]


def test_eval_of_an_unreadable_checkpoint_is_one_line(shards, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 100)
    r = run_cli("eval", str(bad), "--shards", str(shards))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not a readable safetensors file" in lines[0], r.stderr


def test_sample_and_encode(tiny_run, shards, tmp_path):
    r = run_cli("sample", str(tiny_run), str(tmp_path / "s"), "--n", "6", "--seed", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s" / "samples.png").stat().st_size > 100
    assert sorted(p.name for p in (tmp_path / "s").glob("sample_*.png")) == [f"sample_{i:04d}.png" for i in range(6)]
    r = run_cli("encode", str(tiny_run / "checkpoints"), "--shards", str(shards), "--out", str(tmp_path / "z.npz"))
    assert r.returncode != 0  # a folder of checkpoints is not a run folder: one line
    r = run_cli("encode", str(tiny_run), "--shards", str(shards), "--out", str(tmp_path / "z.npz"))
    assert r.returncode == 0, r.stderr[-2000:]
    z = np.load(tmp_path / "z.npz")
    assert z["mu"].shape == (60, 8) and z["logvar"].shape == (60, 8) and z["labels"].shape == (60,)
    assert set(z["labels"].tolist()) == set(range(10))


@needs_loader
def test_sigma_vae_learns_its_sigma(shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={run}", *TINY_MODEL, "--train.batch_size=16",
                "--data.num_threads=1", "--log.wandb_mode=disabled", "--train.max_steps=40", "--log.log_every=10",
                "--train.eval_every=20", "--loss.recon=gaussian", "--optim.lr=1e-2")
    assert r.returncode == 0, r.stderr[-2000:]
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"split": "val"' in line]
    assert val[-1]["sigma"] < val[0]["sigma"] < 1.0  # learned, from exp(0) = 1 downwards
    from vae_dist.checkpoint import load_weights

    assert load_weights(run / "model.safetensors").log_sigma.exp().item() == pytest.approx(val[-1]["sigma"], rel=1e-5)
    r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={tmp_path / 'x'}", "--model.learned_sigma=true")
    assert r.returncode == 2 and "needs loss.recon=gaussian" in r.stderr
