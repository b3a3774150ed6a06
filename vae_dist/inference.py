"""The trained model put to use: likelihood evaluation, prior samples, latent codes.

    vae-dist eval CKPT [--shards DIR] [--split val] [--iw K] [--json FILE]
    vae-dist sample CKPT OUT [--n N] [--seed S]
    vae-dist encode CKPT [--shards DIR] [--split val] --out FILE.npz

CKPT is a checkpoint folder, a run folder or a weights file. `eval` scores every image of
the split under a discretized Gaussian decoder (losses.discretized_gaussian_log_likelihood):
  elbo_bpd  the ELBO, -E_q[log p(x|z) + log p(z) - log q(z|x)], averaged over K samples
  iw_bpd    the importance-weighted bound with the same K samples (Burda et al. 2016):
            -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x); never looser than elbo_bpd, equal at K=1
both in bits per subpixel. sigma is the decoder's: learned (loss.recon=gaussian) or, for the
seed's MSE objective, the maximum-likelihood shared sigma on training images (never on the
split being scored). Under `accelerate launch` each rank scores its part and the sums meet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from vae_dist.checkpoint import find_weights, load_weights
from vae_dist.config import DataConfig
from vae_dist.data import unit_float
from vae_dist.data.loaders import build_loader, check_model_fits_shards
from vae_dist.data.shards import ShardSet
from vae_dist.distributed import rank_zero_decides
from vae_dist.errors import UserError
from vae_dist.files import output_dir, output_file, writing
from vae_dist.losses import bits_per_dim, discretized_gaussian_log_likelihood, psnr
from vae_dist.model import VAE


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _batches(shards: ShardSet, split: str, batch_size: int, acc, limit: int | None = None):
    """Every image of the split (or its first `limit`) once across ranks: this rank's part,
    as float batches. The same images for any number of processes."""
    cfg = DataConfig(shards=shards.root, cache="none")
    loader = build_loader(shards, cfg, split, batch_size, rank=acc.process_index, world=acc.num_processes,
                          device=acc.device, train=False, seed=0, limit=limit)
    try:
        for x, y in loader.epoch(0):
            yield unit_float(x), y
    finally:
        loader.close()  # DALI's pipeline, while CUDA is up


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp())).sum(-1)


@torch.no_grad()
def calibrate_sigma(model: VAE, shards: ShardSet, acc, images: int, batch_size: int) -> float:
    """The ML shared sigma of a Gaussian decoder on training images: sqrt(mean squared error
    per subpixel) with z ~ q(z|x), as for the σ-VAE's 'optimal sigma'."""
    sums = torch.zeros(2, device=acc.device, dtype=torch.float64)
    for x, _ in _batches(shards, "train", batch_size, acc, limit=images):
        x_hat, _, _ = model(x)
        sums += torch.stack([(x_hat - x).pow(2).sum().double(), sums.new_full((), x.numel())])  # a fill, not a blocking copy
    sq, n = acc.reduce(sums, reduction="sum").tolist()
    return math.sqrt(sq / n)


@torch.no_grad()
def run_shards(weights: Path, shards: str | None, purpose: str) -> str:
    """The shard folder a command on a checkpoint reads (viz, eval, encode): `shards` when given,
    else the run's own, data.shards of the config.yaml saved beside the weights (in every
    checkpoint and run folder)."""
    saved_config = weights.parent / "config.yaml"
    if shards is None and saved_config.is_file():
        shards = _shards_of_run(saved_config)
    if shards is None:
        raise UserError(f"no shard folder known {purpose}: pass --shards DIR")
    return shards


def _shards_of_run(config_file: Path) -> str | None:
    """data.shards of the run whose config.yaml this is (None where it names none). A file that
    is not a config (damaged, edited, YAML tags) is a one-line error naming it, read as
    `--config` reads one (safely: a tag never builds an object)."""
    from vae_dist.config import load_yaml
    from vae_dist.errors import ConfigError

    try:
        shards = load_yaml(config_file).get("data.shards")
    except ConfigError as e:
        raise ConfigError(f"{e}; pass --shards DIR") from None
    if shards is not None and not isinstance(shards, str):
        raise ConfigError(f"config file {config_file}: data.shards must be a folder name, got {shards!r}; "
                          f"pass --shards DIR")
    return shards


def evaluate_checkpoint(ckpt: str, shards: str | None, split: str = "val", iw: int = 1, json_path: str | None = None,
                        calib_images: int = 10000, batch_size: int = 256, seed: int = 0) -> dict:
    """The scores of a checkpoint on a split. `json_path` is only checked here, before the work (a
    folder it cannot be written into ends the command at once): the caller shows the result,
    then writes it there (`write_eval_json`), so a write that fails still leaves it on screen."""
    for name, value in (("--iw", iw), ("--calib-images", calib_images), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    acc = _accelerator()
    weights = find_weights(ckpt)
    model = load_weights(weights, acc.device)
    shards = run_shards(weights, shards, "to score")
    shard_set = ShardSet.open(shards)
    check_model_fits_shards(model.cfg, shard_set, weights)
    if json_path:  # once the inputs are known good; rank 0 writes it, so rank 0 checks and tells every rank
        rank_zero_decides(acc, lambda: output_file(json_path, "eval --json file"))
    torch.manual_seed(seed + acc.process_index)
    if model.log_sigma is not None:
        sigma, source = float(model.log_sigma.exp()), "learned (loss.recon=gaussian)"
    else:
        sigma = calibrate_sigma(model, shard_set, acc, calib_images, batch_size)
        source = f"maximum likelihood on up to {calib_images} train images"
    sums = torch.zeros(4, device=acc.device, dtype=torch.float64)  # elbo, iw, sq_err(decode(mu)), images
    for x, _ in _batches(shard_set, split, batch_size, acc):
        mu, logvar = model.encode(x)
        log_w = []
        for _ in range(iw):
            z = model.reparameterize(mu, logvar)
            log_px = discretized_gaussian_log_likelihood(x, model.decode(z), sigma)
            log_w.append(log_px + _log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).double()
                         - _log_normal(z, mu, logvar).double())
        log_w = torch.stack(log_w)  # (K, B)
        sums += torch.stack([log_w.mean(0).sum(), (torch.logsumexp(log_w, 0) - math.log(iw)).sum(),
                             (model.decode(mu) - x).pow(2).sum().double(),
                             sums.new_full((), x.shape[0])])  # a fill, not a blocking copy
    elbo, iw_bound, sq_err, count = acc.reduce(sums, reduction="sum").tolist()
    if count == 0:
        raise UserError(f"split '{split}' of {shards} holds no images")
    if not all(map(math.isfinite, (elbo, iw_bound, sq_err))):
        raise UserError(f"the model in {weights} gives non-finite outputs on {split} (ELBO {elbo / count:.4g}): its "
                        f"weights diverged; evaluate an earlier checkpoint")
    dims = model.cfg.num_dims
    result = {
        "checkpoint": str(weights), "shards": str(shards), "split": split, "images": int(count),
        "elbo_bpd": bits_per_dim(-elbo / count, dims), "iw_bpd": bits_per_dim(-iw_bound / count, dims), "iw_k": iw,
        "elbo_nats": elbo / count, "iw_nats": iw_bound / count, "psnr": psnr(sq_err / (count * dims)),
        "sigma": sigma, "sigma_source": source,
    }
    return result


def write_eval_json(result: dict, path: str) -> bool:
    """`eval --json`: the result as JSON, written by the main process (True there)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return False
    with writing(path, "eval --json file"):
        Path(path).write_text(json.dumps(result, indent=1))
    return True


def format_eval(r: dict) -> str:
    return (f"{r['split']}: {r['images']} images | ELBO {r['elbo_bpd']:.4f} bits/dim | IW (K={r['iw_k']}) "
            f"{r['iw_bpd']:.4f} bits/dim | PSNR {r['psnr']:.2f} dB | sigma {r['sigma']:.4f} ({r['sigma_source']})")


@torch.no_grad()
def sample_images(ckpt: str, out: str, n: int = 64, seed: int = 0) -> list[Path]:
    """n images from the prior: a grid and each image as PNG."""
    from torchvision.utils import make_grid, save_image

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    model = load_weights(find_weights(ckpt))
    out_dir = output_dir(out, "sample output folder")  # once the weights are known good
    images = model.sample(n, generator=torch.Generator().manual_seed(seed)).float().clamp(0, 1)
    grid = out_dir / "samples.png"
    with writing(out_dir, "sample output folder"):
        save_image(make_grid(images, nrow=max(1, int(math.sqrt(n))), padding=2), grid)
        paths = [grid]
        for i, img in enumerate(images):
            paths.append(out_dir / f"sample_{i:04d}.png")
            save_image(img, paths[-1])
    return paths


@torch.no_grad()
def encode_split(ckpt: str, shards: str | None, out: str, split: str = "val", batch_size: int = 256) -> Path:
    """Posterior means, log-variances and labels of every image of a split, as .npz."""
    acc = _accelerator()
    if acc.num_processes > 1:
        raise UserError("vae-dist encode runs in one process (it writes one file)")
    path = Path(out)
    if path.suffix != ".npz":  # np.savez would add it: the name printed is the file written
        path = path.with_name(path.name + ".npz")
    if path.is_dir() or Path(out).is_dir():
        raise UserError(f"encode --out {out} is a folder: name the .npz file to write")
    weights = find_weights(ckpt)
    model = load_weights(weights, acc.device)
    shard_set = ShardSet.open(run_shards(weights, shards, "to encode"))
    check_model_fits_shards(model.cfg, shard_set, weights)
    output_file(path, "encode --out file")  # once the inputs are known good: a failure makes nothing
    mus, logvars, labels = [], [], []
    for x, y in _batches(shard_set, split, batch_size, acc):
        mu, logvar = model.encode(x)
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
        labels.append(y.cpu())
    with writing(path, "encode --out file"):
        np.savez(path, mu=torch.cat(mus).numpy(), logvar=torch.cat(logvars).numpy(),
                 labels=torch.cat(labels).numpy())
    return path
