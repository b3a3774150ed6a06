"""Shared fixtures: the sample data set and its shards, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--model.widths=[8,16,16,32]", "--model.latent_dim=8"]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    from vae_dist.data.sample import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("data") / "tiny-sample", train_per_class=20,
                               val_per_class=6, test_count=5, seed=1)


@pytest.fixture(scope="session")
def shards(sample_root, tmp_path_factory) -> Path:
    """200 train / 60 val samples in shards of 64."""
    from vae_dist.data.pack import PackOptions, pack

    out = tmp_path_factory.mktemp("shards")
    pack(sample_root, out, PackOptions(shard_size=64, workers=2))
    return out


def run_cli(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`python -m vae_dist ...` as a user runs it."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vae_dist", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def launch_command(nproc: int) -> list[str]:
    """`accelerate launch --multi_gpu ... -m vae_dist` (gloo on a CPU machine)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "vae_dist"]


def accelerate_launch(nproc: int, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    """A real `accelerate launch` with nproc processes, run to the end."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(launch_command(nproc) + list(args), capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
