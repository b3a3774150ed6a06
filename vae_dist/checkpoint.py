"""Checkpoints and weights files: written durably, proven on read, loaded without unpickling.

checkpoints/step_NNNNNNN/
    model.safetensors      weights (+ the architecture in the metadata)
    optimizer.pt           optimizer state_dict: tensors and numbers only (weights_only load)
    rng_rank{R}.pt         each rank's torch RNG states (tensors)
    trainer_state.json     step, epoch, data position, bad-step counters, loss-scaler state
    config.yaml            the resolved config of the run
    checksums.json         size and sha256 of every file above, written last
A checkpoint is built in a hidden `.tmp-step_*` folder, every file fsynced, then renamed into
place and the folder fsynced, so neither a crash nor a power loss leaves a "complete" folder
with missing or zero-length files. `verify_checkpoint` checks the checksums before a resume
trusts a folder.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from vae_dist.errors import SharedError, UserError, first_line
from vae_dist.files import fsync_dir, replace_durable, sha256_file, write_atomic, write_bytes_durable
from vae_dist.model import VAE, VAEConfig

WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def _weights_bytes(model: VAE) -> bytes:
    meta = {"vae_config": json.dumps(dataclasses.asdict(model.cfg))}
    return save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, metadata=meta)


def save_weights(model: VAE, path: Path) -> None:
    """The weights alone (final model.safetensors), written whole or not at all."""
    write_atomic(path, _weights_bytes(model))


def architecture_difference(saved: VAEConfig, wanted: VAEConfig) -> str:
    """The model.* keys on which two architectures differ, as `model.KEY=SAVED (this run: WANTED)`,
    each value as it is typed on the command line."""
    from vae_dist.config import typed_value

    a, b = dataclasses.asdict(saved), dataclasses.asdict(wanted)
    return ", ".join(f"model.{k}={typed_value(a[k])} (this run: {typed_value(b[k])})" for k in a if a[k] != b[k])


def read_vae_config(path: Path) -> VAEConfig:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    if "vae_config" not in meta:
        raise UserError(f"{path} holds no vae_config metadata: not a vae-dist weights file")
    try:
        raw = json.loads(meta["vae_config"])
        raw["widths"] = tuple(raw["widths"])
        return VAEConfig(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path} has an unreadable vae_config ({first_line(e)})") from None


def _load_state_dict(model: VAE, path: Path) -> None:
    try:
        tensors = load(Path(path).read_bytes())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    bad = next((name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise UserError(f"{path} holds non-finite weights (NaN or inf in {bad}): the run that wrote them diverged; "
                        f"use an earlier checkpoint")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # missing/unexpected keys, wrong shapes
        raise UserError(f"{path} does not fit its own architecture ({first_line(e)})") from None


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    """A VAE from a weights file alone (no trainer, no config file needed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    model = VAE(read_vae_config(path))
    _load_state_dict(model, path)
    return model.to(device).eval()


def find_weights(path: str | Path) -> Path:
    """model.safetensors given a file, a checkpoint folder, or a run folder (the final weights,
    else the newest checkpoint that verifies)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"not found: {path}")
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    if (path / STATE).is_file():
        raise UserError(f"checkpoint {path} has no {WEIGHTS}")
    newest = newest_verified_checkpoint(path)
    if newest is not None:
        return newest / WEIGHTS
    raise UserError(f"no {WEIGHTS} in {path} and no checkpoint there that verifies")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state (step, epoch, data position, ...), every key it holds of
    those a resume uses checked: an edited or foreign file is a one-line error naming the file
    and the key, not a failure deep in the resume (a negative step divided by zero)."""
    file = Path(path) / STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path}: unreadable {STATE} ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint file {file} must hold a JSON object of keys, got {json.dumps(state)[:40]}")
    for key in _STATE_REQUIRED:
        if key not in state:
            raise UserError(f"checkpoint file {file} lacks the key '{key}' (not a vae-dist checkpoint, or edited)")
    for key, (ok, must) in _STATE_KEYS.items():
        if key in state and not ok(state[key]):
            raise UserError(f"checkpoint file {file}: key '{key}' must be {must}, got {json.dumps(state[key])[:40]} "
                            f"(not a vae-dist checkpoint, or edited)")
    return state


def _whole(least: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# trainer_state.json: the keys a resume reads, each with its test and what it must be. The first
# three are the data position, in every checkpoint ever written; a checkpoint of an older
# version may lack the others (they keep their defaults); keys not named here are not read.
_STATE_REQUIRED = ("step", "epoch", "batch_in_epoch")
_STATE_KEYS = {
    "step": (_whole(0), "a whole number 0 or more"),
    "epoch": (_whole(0), "a whole number 0 or more"),
    "batch_in_epoch": (_whole(0), "a whole number 0 or more"),
    "bad_steps": (_whole(0), "a whole number 0 or more"),
    "skipped_steps": (_whole(0), "a whole number 0 or more"),
    "sigma_recon": (_number, "a number"),
    "sigma_steps": (_number, "a number"),
    "sigma": (lambda v: v is None or (_number(v) and not v < 0), "a number 0 or more, or null"),
    "last_eval_step": (_whole(-1), "a whole number -1 or more"),
    "resumes": (_whole(0), "a whole number 0 or more"),
    "batch_size": (_whole(1), "a whole number 1 or more"),
    "world_size": (_whole(1), "a whole number 1 or more"),
    "wandb_step": (lambda v: v is None or _whole(0)(v), "a whole number 0 or more, or null"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "an object (the loss scaler's state) or null"),
}


def saved_step(path: Path) -> int:
    """The step a checkpoint was written at."""
    return int(read_trainer_state(path)["step"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every step_* folder of the run, oldest first, whether or not it verifies."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> str | None:
    """None when every file the checkpoint recorded is there with its size and sha256;
    otherwise why not, in a few words."""
    path = Path(path)
    try:
        record = json.loads((path / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        return f"no {CHECKSUMS} (written last: the checkpoint is incomplete)"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"unreadable {CHECKSUMS} ({first_line(e)})"
    for name in (WEIGHTS, STATE, "optimizer.pt"):
        if name not in record:
            return f"{CHECKSUMS} does not list {name}"
    for name, want in sorted(record.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if sha256_file(file) != want["sha256"]:
            return f"{name} does not match its sha256 (damaged)"
    try:  # written by an older version during a non-finite streak (today's are not written then)
        state = read_trainer_state(path)
    except UserError:
        return None  # a damaged trainer state is the resume's one line (read_trainer_state's)
    # under fp16 the loss scaler's overflows are routine skips, not a divergence
    bad = state.get("bad_steps", 0) if not state.get("scaler") else 0
    if bad > 0:
        return f"written after {bad} non-finite steps in a row (the run was diverging)"
    return None


def newest_verified_checkpoint(run_dir: Path, on_skip=None) -> Path | None:
    """The run's newest checkpoint that verifies; `on_skip(path, problem)` hears of every newer
    one that does not."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(path, problem)
    return None


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _agree(accelerator, error: str | None) -> str | None:
    """The first failing rank's error (None: every rank succeeded), known to every rank, so a
    write that fails on one rank ends the run on all of them instead of leaving the others
    waiting at the next barrier."""
    if accelerator.num_processes == 1:
        return error
    from accelerate.utils import gather_object

    return next((e for e in gather_object([error]) if e), None)


def save_checkpoint(accelerator, run_dir: Path, model: VAE, optimizer, trainer_state: dict,
                    config_yaml: str, keep_last: int) -> Path:
    """Collective: every rank must call it. Rank 0 writes the shared files; every rank its RNG.

    A checkpoint that cannot be written (a full disk, a quota, a read-only or foreign folder)
    ends the run on every rank with one line: which checkpoint, the space free against what it
    needs, and the newest complete checkpoint, which `train.resume=auto` continues from. The
    half-written folder is removed at once; older checkpoints are untouched."""
    step = trainer_state["step"]
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step_{step:07d}", root / f".tmp-step_{step:07d}"
    main = accelerator.is_main_process
    payload = {}
    if main:  # serialized before a byte is written: its size is what the checkpoint needs
        scaler = accelerator.scaler
        state = dict(trainer_state, world_size=accelerator.num_processes,
                     scaler=scaler.state_dict() if scaler is not None else None)
        payload = {WEIGHTS: _weights_bytes(model), "optimizer.pt": _torch_bytes(optimizer.state_dict()),
                   "config.yaml": config_yaml.encode(), STATE: json.dumps(state, indent=1).encode()}

    def phase(write, everyone: bool = False) -> None:
        error = None
        if everyone or main:
            try:
                write()
            except OSError as e:
                error = e.strerror or str(e)
        error = _agree(accelerator, error)
        if error is not None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            need = sum(map(len, payload.values())) or None
            newest = newest_verified_checkpoint(run_dir)
            raise SharedError(
                f"cannot write checkpoint {final.name} in {root}: {error}; "
                f"{_size(_free_bytes(root))} free" + (f", a checkpoint needs {_size(need)}" if need else "")
                + (f"; the newest complete checkpoint is {newest.name}, which train.resume=auto continues from"
                   if newest is not None else "; no complete checkpoint yet: a new start begins at step 0")
                + " (free space or choose another train.out_dir)")

    def make_tmp():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_rng():
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        write_bytes_durable(tmp / f"rng_rank{accelerator.process_index}.pt", _torch_bytes(rng))

    def write_rest():
        files = {name: write_bytes_durable(tmp / name, data) for name, data in payload.items()}
        for rank in range(accelerator.num_processes):
            name = f"rng_rank{rank}.pt"
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        write_bytes_durable(tmp / CHECKSUMS, json.dumps({"files": files}, indent=1).encode())
        fsync_dir(tmp)
        if final.exists():  # the same step again (a resume that lost later checkpoints)
            shutil.rmtree(final)
        replace_durable(tmp, final)
        # keep_last counts this one and the newest before it; nothing later than this step is
        # pruned (a resume set aside whatever lay beyond it, see run_folder)
        older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < step]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    phase(make_tmp)
    phase(write_rng, everyone=True)
    phase(write_rest)
    return final


def load_checkpoint(accelerator, path: Path, model: VAE, optimizer) -> dict:
    """Restores model, optimizer, scaler and this rank's RNG; returns the trainer state.
    The caller has verified the folder (`verify_checkpoint`)."""
    path = Path(path)
    state = read_trainer_state(path)
    ckpt_cfg = read_vae_config(path / WEIGHTS)
    if ckpt_cfg != model.cfg:  # run_folder.choose_start refuses this earlier, with the choices
        raise UserError(f"checkpoint {path} holds another architecture: {architecture_difference(ckpt_cfg, model.cfg)}")
    _load_state_dict(model, path / WEIGHTS)
    # every rank reads its files, then all agree: one rank's bad RNG file ends the run on all
    error = _restore(path / "optimizer.pt", lambda: optimizer.load_state_dict(_read_torch_file(path / "optimizer.pt")))
    if error is None and accelerator.scaler is not None and state.get("scaler"):
        error = _restore(path / STATE, lambda: accelerator.scaler.load_state_dict(state["scaler"]), key="scaler")
    rng_file = path / f"rng_rank{accelerator.process_index}.pt"
    if error is None and rng_file.is_file() and state.get("world_size") == accelerator.num_processes:
        error = _restore(rng_file, lambda: _set_rng(_read_torch_file(rng_file)))
    error = _agree(accelerator, error)
    if error is not None:
        raise SharedError(error)
    return state


def _read_torch_file(file: Path):
    """A checkpoint's torch file, unpickled with weights_only: a file that holds anything but
    tensors and plain data (a pickled object, a damaged stream) is refused by torch, nothing in
    it runs, with a pickle.UnpicklingError that _restore reports without torch's advice."""
    import warnings

    with warnings.catch_warnings():  # e.g. on a pickle protocol torch.save never writes: the error says it
        warnings.simplefilter("ignore")
        return torch.load(file, map_location="cpu", weights_only=True)


def _torch_reason(e: BaseException) -> str:
    """What torch.load found, without its advice: the first line of its message that does
    not tell how to load the file unsafely or where to read about it."""
    advice = ("weights_only", "Weights only", "torch.load", "file an issue")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    found = [line for line in lines if not any(a in line for a in advice)]
    return found[0].split(". ")[0].rstrip(".") if found else "not plain tensors and numbers"


def _set_rng(rng) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _restore(file: Path, load, key: str | None = None) -> str | None:
    """Runs `load` (which reads `file` and puts its state in place); None, or the one line that
    says why it could not: the file (and key) named, never torch's advice."""
    try:
        load()
    except pickle.UnpicklingError as e:  # the weights_only unpickler's refusal (_read_torch_file)
        return f"checkpoint file {file} cannot be read safely ({_torch_reason(e)}): not a vae-dist checkpoint file"
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError, EOFError) as e:
        name = f"{file} (key '{key}')" if key else str(file)
        return f"checkpoint file {name} does not load ({_torch_reason(e)}): damaged, or not a vae-dist checkpoint"
    return None


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
