"""Checkpoints and weights files, written atomically and read without unpickling objects.

checkpoints/step_NNNNNNN/
    model.safetensors      weights (+ the architecture in the metadata)
    optimizer.pt           optimizer state_dict: tensors and numbers only (weights_only load)
    rng_rank{R}.pt         each rank's torch RNG states (tensors)
    trainer_state.json     step, epoch, data position, bad-step counters, loss-scaler state
    config.yaml            the resolved config of the run
A checkpoint is built in a hidden `.tmp-step_*` folder and renamed into place when
complete, so a crash mid-write never touches the newest good one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vae_dist.errors import UserError
from vae_dist.model import VAE, VAEConfig

WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def save_weights(model: VAE, path: Path) -> None:
    meta = {"vae_config": json.dumps(dataclasses.asdict(model.cfg))}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = Path(path).with_name(Path(path).name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_vae_config(path: Path) -> VAEConfig:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "vae_config" not in meta:
        raise UserError(f"{path} holds no vae_config metadata: not a vae-dist weights file")
    raw = json.loads(meta["vae_config"])
    raw["widths"] = tuple(raw["widths"])
    return VAEConfig(**raw)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    """A VAE from a weights file alone (no trainer, no config file needed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    model = VAE(read_vae_config(path))
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval()


def find_weights(path: str | Path) -> Path:
    """model.safetensors given a file, a checkpoint folder, or a run folder (newest wins)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    newest = latest_checkpoint(path)
    if newest is not None:
        return newest / WEIGHTS
    raise UserError(f"no model.safetensors in {path} or its checkpoints")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, run_dir: Path, model: VAE, optimizer, trainer_state: dict,
                    config_yaml: str, keep_last: int) -> Path:
    """Collective: every rank must call it. Rank 0 writes the shared files; every rank its RNG."""
    step = trainer_state["step"]
    final = checkpoint_dir(run_dir) / f"step_{step:07d}"
    tmp = checkpoint_dir(run_dir) / f".tmp-step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_weights(model, tmp / WEIGHTS)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        scaler = accelerator.scaler
        state = dict(trainer_state, world_size=accelerator.num_processes,
                     scaler=scaler.state_dict() if scaler is not None else None)
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model: VAE, optimizer) -> dict:
    """Restores model, optimizer, scaler and this rank's RNG; returns the trainer state."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise UserError(f"not a checkpoint folder (no {STATE}): {path}")
    state = json.loads((path / STATE).read_text())
    ckpt_cfg = read_vae_config(path / WEIGHTS)
    if ckpt_cfg != model.cfg:
        raise UserError(f"checkpoint {path} holds a different architecture ({ckpt_cfg}) than model.* ({model.cfg})")
    model.load_state_dict(load_file(str(path / WEIGHTS), device="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file() and state.get("world_size") == accelerator.num_processes:
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
