"""Run under `accelerate launch` by tests/test_gpu.py (2+ GPUs: compiled bf16 DDP steps) and by
tests/test_scale_out.py (2 gloo processes, each comm hook): a few steps of the real Trainer,
then every rank's weights compared with rank 0's. They must be bit-identical: DDP averages the
gradients (compressed or not, every rank decompresses the same sum), and every rank applies
the same update.

    python tests/ddp_replicas.py SHARDS RUN OUT.json [--section.key=value ...]  (later keys win)
"""

import json
import sys
from pathlib import Path

import torch

from vae_dist.config import build_config
from vae_dist.train import Trainer


def main(shards: str, run: str, out: str, *overrides: str) -> None:
    cfg = build_config(None, [
        f"--data.shards={shards}", f"--train.out_dir={run}", "--model.widths=[8,16,16,32]", "--model.latent_dim=8",
        "--train.batch_size=8", "--log.wandb_mode=disabled", "--train.max_steps=12", "--log.log_every=4",
        "--train.eval_every=0", "--train.checkpoint_every=0", "--model.compile=true", "--data.cache=gpu",
        "--log.image_every=100000", *overrides])
    trainer = Trainer(cfg)

    def weights():
        return torch.cat([p.detach().float().flatten() for p in trainer.raw_model.parameters()])

    before = weights()
    assert trainer.fit() == 0
    flat = weights()
    gathered = trainer.accelerator.gather(flat[None])  # (world, n)
    if trainer.accelerator.is_main_process:
        Path(out).write_text(json.dumps({
            "world": trainer.world, "steps": trainer.state.step, "precision": trainer.accelerator.mixed_precision,
            "compile": trainer.compile_mode, "comm_hook": cfg.train.ddp_comm_hook,
            "max_abs_difference": (gathered - gathered[0]).abs().max().item(),
            "moved": (flat - before).norm().item()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
