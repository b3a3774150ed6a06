"""`vae-dist demo`: the whole system on the embedded sample data, in minutes on a CPU.

sample-data -> pack -> verify -> train (seed VAE, KL annealing, W&B offline) -> viz.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vae_dist.config import build_config
from vae_dist.data.pack import PackOptions, pack, summary
from vae_dist.data.sample import make_sample_dataset
from vae_dist.data.verify import verify
from vae_dist.errors import DataError, UserError
from vae_dist.files import output_dir
from vae_dist.train import train
from vae_dist.viz import viz_checkpoint


def run_demo(out: str | Path = "runs/demo", steps: int | None = None) -> int:
    out = Path(out)
    on_gpu = torch.cuda.is_available()
    steps = steps if steps is not None else (3000 if on_gpu else 600)
    if steps <= 0:
        raise UserError(f"demo --steps must be positive, got {steps}")
    output_dir(out, "demo --out")
    print(f"== 1/5 sample data (scikit-image photographs, Tiny ImageNet layout) -> {out / 'tiny-sample'}")
    src = make_sample_dataset(out / "tiny-sample", train_per_class=200, val_per_class=50, test_count=50)
    print(f"== 2/5 pack -> {out / 'shards'}")
    print(summary(pack(src, out / "shards", PackOptions(shard_size=500))))
    print("== 3/5 verify")
    problems = verify(out / "shards")
    if problems:
        raise DataError(f"freshly packed shards fail verification: {problems[0]}")
    print("all shards match manifest.json")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a demo starts fresh every time
    print(f"== 4/5 train the seed VAE for {steps} steps -> {run_dir}")
    cfg = build_config(overrides=[
        f"--data.shards={out / 'shards'}", f"--train.out_dir={run_dir}", f"--train.max_steps={steps}",
        f"--train.eval_every={max(1, steps // 3)}", f"--train.checkpoint_every={max(1, steps // 2)}",
        f"--log.image_every={max(1, steps // 3)}", f"--log.log_every={min(25, steps)}", "--data.num_threads=2",
        "--loss.kl_warmup=0.3",
    ])
    code = train(cfg)
    if code:
        return code
    print(f"== 5/5 viz -> {out / 'pictures'}")
    for path in viz_checkpoint(str(run_dir), str(out / "pictures"), shards=str(out / "shards")):
        print(f"  {path}")
    wandb_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    print(f"\nrun folder: {run_dir} (config.yaml, metrics.jsonl, checkpoints/, images/, model.safetensors)")
    if wandb_dirs:
        print(f"W&B offline run: {wandb_dirs[-1]}\n  upload it with: wandb sync {wandb_dirs[-1]}")
    return 0
