"""Evaluation during training: the val pass and the decoder's σ for bits/dim.

Every val sample once across ranks (each rank its own part), summed over ranks: the training
objective, the KL, the PSNR of decode(mu), and the ELBO as a discretized likelihood in
bits/dim under σ (DESIGN.md, Likelihood). The MSE objective has no σ of its own: it is the
maximum-likelihood shared σ on the training images seen since the last evaluation.
"""

from __future__ import annotations

import contextlib
import math

import torch

from vae_dist.data import unit_float
from vae_dist.losses import bits_per_dim, discretized_gaussian_log_likelihood, kl_divergence, psnr, recon_loss
from vae_dist.metrics import unsynced_recon
from vae_dist.model import VAE
from vae_dist.step import TrainStep
from vae_dist.train_state import TrainState

EVAL_SEED = 20241205  # the val pass's own noise stream (Evaluator._own_noise)


class Evaluator:
    """Collective: every rank evaluates its part; the hooks log the row (rank 0)."""

    def __init__(self, accelerator, model: VAE, val_loader, loss_cfg, step: TrainStep, *, every: int, hooks,
                 at_epoch_end: bool = True, progress=lambda: None):
        self.accelerator, self.model, self.val_loader = accelerator, model, val_loader
        self.progress = progress  # told of every batch (the stall watchdog: a long val pass is not a hang)
        self.recon_kind, self.step, self.every, self.hooks = loss_cfg.recon, step, every, hooks
        self.at_epoch_end = at_epoch_end
        self.device = accelerator.device

    def due(self, step: int, epoch_end: bool = False) -> bool:
        """Every train.eval_every steps (0: never by steps) and, with train.eval_at_epoch_end, at
        every epoch end. The last step is evaluated apart (the Trainer's finish)."""
        return (epoch_end and self.at_epoch_end) or (bool(self.every) and step % self.every == 0)

    def sigma(self, state: TrainState) -> float | None:
        """The decoder's sigma for bits/dim: learned (loss.recon=gaussian), or for the seed's MSE
        the maximum-likelihood shared sigma on training images (Rybkin et al. 2021): the root
        of their mean squared error per subpixel over the train steps since the last evaluation
        (all ranks', so every rank scores with the same sigma); the next one counts the steps
        after this call. Collective."""
        model = self.model
        if model.log_sigma is not None:
            return float(model.log_sigma.detach().exp())  # SYNC: evaluation only
        window_recon, window_good = unsynced_recon(self.accelerator, self.step)
        recon, good = state.sigma_recon + window_recon, state.sigma_steps + window_good
        if good > 0:
            mean = recon / good
            state.sigma = math.sqrt(mean / model.cfg.num_dims if self.recon_kind == "sum" else mean)
            # the next sigma counts the steps after this one; the window's part so far is
            # already counted, and the next sync point adds the whole window
            state.sigma_recon, state.sigma_steps = -window_recon, -window_good
        return state.sigma  # no train step since the last evaluation: the sigma it used

    @contextlib.contextmanager
    def _own_noise(self):
        """The val pass draws its reparameterization noise from a stream of its own, the same at every
        evaluation: the training noise (saved in checkpoints) is untouched, so how often a run
        evaluates, or a final evaluation before a checkpoint, changes nothing of its training, and
        a resumed run continues as the unbroken one would."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_SEED)
            yield

    def _val_pass(self, model, sigma, sums) -> None:
        for x, _ in self.val_loader.epoch(0):  # train.eval_images caps it (the loader's count)
            x = unit_float(x)
            with self.accelerator.autocast():
                x_hat, mu, logvar = model(x)
                x_mean = model.decode(mu)
            n = x.shape[0]
            log_px = discretized_gaussian_log_likelihood(x, x_hat, sigma).sum() if sigma else x.new_zeros(())
            sums += torch.stack([
                recon_loss(x_hat, x, self.recon_kind, model.log_sigma).double() * n,
                kl_divergence(mu, logvar).double() * n, (x_mean.float() - x).pow(2).sum().double(),
                log_px.double(), sums.new_full((), n),  # a fill kernel: no blocking host-to-device copy
            ])
            self.progress()

    @torch.no_grad()
    def evaluate(self, state: TrainState) -> dict | None:
        """The val row of `state.step`, logged; None where that step was evaluated already (a
        resume at an evaluated step) or the val split is empty."""
        if state.last_eval_step == state.step:
            return None
        state.last_eval_step = state.step
        model = self.model  # eager and unwrapped: ranks may run different batch counts here
        model.eval()
        sigma = self.sigma(state)
        # recon (objective), kl, sq_err(decode(mu)), log p(x|z) discretized under sigma, images
        sums = torch.zeros(5, device=self.device, dtype=torch.float64)
        with self._own_noise():
            self._val_pass(model, sigma, sums)
        model.train()
        sums = self.accelerator.reduce(sums, reduction="sum")  # collective: all ranks
        recon, kl, sq_err, log_px, count = sums.tolist()  # SYNC
        if count == 0:
            return None
        pixels = model.cfg.num_dims
        row = {
            "split": "val", "step": state.step, "epoch": state.epoch, "loss": (recon + kl) / count,
            "recon": recon / count, "kl": kl / count, "psnr": psnr(sq_err / (count * pixels)), "images": int(count),
        }
        if sigma:  # the ELBO of 8-bit images under the decoder's sigma, in nats (`elbo_nats`, as `vae-dist eval
            # --json` names it) and as bits/dim; the only ELBO logged anywhere (the train row has none)
            row.update(elbo_nats=(log_px - kl) / count, bpd=bits_per_dim((kl - log_px) / count, pixels), sigma=sigma)
        if self.device.type == "cuda":  # the whole device's use (DALI's buffers too), not only PyTorch's
            free, total = torch.cuda.mem_get_info(self.device)
            row["gpu_mem_used_gib"] = (total - free) / 2**30
        self.hooks.log_eval(row)
        return row
