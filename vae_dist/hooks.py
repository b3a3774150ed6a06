"""Every rank-zero side effect of training, behind one interface.

`make_hooks` returns `RankZeroHooks` on the main process and the no-op `Hooks` elsewhere,
so the training loop never tests the rank. Rank zero writes config.yaml, metrics.jsonl,
PNG pictures and the W&B run. A failing sink (W&B, a full disk for pictures) is reported
once, switched off, and never stops training.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

import torch

from vae_dist import viz
from vae_dist.data import unit_float


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Hooks:
    """The no-op hooks of ranks other than zero; also the interface."""

    def on_train_start(self, config_yaml: str, info: dict, wandb_step: int | None = None) -> None:
        """`info`: the run's launch facts; `wandb_step`: where a resumed run's W&B history was
        at its checkpoint (for log.wandb_resume=rewind)."""

    def log_scalars(self, row: dict) -> None: ...

    def log_eval(self, row: dict) -> None: ...

    def maybe_images(self, step: int, model, final: bool = False) -> None: ...

    def on_checkpoint(self, path: Path) -> None: ...

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of the hooks' own state (rank 0 writes the trainer state)."""
        return {}

    def say(self, text: str) -> None: ...

    def close(self, weights: Path | None = None, failed: bool = False, stopped_by: int = 0) -> None: ...

    def detach(self) -> None:
        """The run folder is lost: nothing more is written into it (or into a new one at its path)."""


def make_hooks(accelerator, cfg, run_dir: Path, val_loader, class_names: list[str], folder_lost=lambda: None) -> Hooks:
    """`class_names`: the labels' names in order (the run's ShardSet), for the latent-space picture;
    `folder_lost`: why the run folder can no longer be written (RunFolderLock.lost), None while it can."""
    if not accelerator.is_main_process:
        return Hooks()
    return RankZeroHooks(cfg, run_dir, val_loader, class_names, folder_lost)


def wandb_mode(configured: str | None) -> str:
    """Offline unless asked otherwise or a key is set, so a run never blocks on the network."""
    if configured is not None:
        return configured
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RankZeroHooks(Hooks):
    def __init__(self, cfg, run_dir: Path, val_loader, class_names: list[str], folder_lost=lambda: None):
        self.cfg, self.run_dir, self.val_loader = cfg, Path(run_dir), val_loader
        self.folder_lost = folder_lost
        self.image_dir = self.run_dir / "images"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._failed: set[str] = set()
        self._fixed: torch.Tensor | None = None
        self._last_image_step = -1
        self.class_names = list(class_names)
        self._scatter = None
        self._bar = None  # tqdm, on a terminal only
        self.wandb = None
        self._resumes = 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = None  # opened at the first row: a start that fails before it leaves no file

    # -- failure isolation ---------------------------------------------------------------
    def _guard(self, sink: str, fn, *args, **kwargs):
        if sink in self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            self._failed.add(sink)
            print(f"vae-dist: warning: {sink} failed and is switched off for this run "
                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
            return None

    # -- hooks ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line for the person watching: above the live bar on a terminal, plain elsewhere."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def on_train_start(self, config_yaml: str, info: dict, wandb_step: int | None = None) -> None:
        (self.run_dir / "config.yaml").write_text(config_yaml)
        print("training: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        if sys.stdout.isatty():  # a live bar for a person; a cluster log keeps plain lines
            from tqdm import tqdm

            self._bar = tqdm(total=info["total_steps"], initial=info["start_step"], unit="step",
                             dynamic_ncols=True, leave=True)
        self._guard("wandb", self._init_wandb, info, wandb_step)

    def _init_wandb(self, info: dict, wandb_step: int | None) -> None:
        mode = wandb_mode(self.cfg.log.wandb_mode)
        if mode == "disabled":
            return
        import wandb

        from vae_dist.config import to_dict

        id_file = self.run_dir / "wandb_run_id"  # the same W&B run across resumes
        # a sweep agent hands its trial a run id (and the sweep's project): they win
        run_id = os.environ.get("WANDB_RUN_ID") or (id_file.read_text().strip() if id_file.is_file()
                                                     else secrets.token_hex(4))
        in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
        log = self.cfg.log
        # A resume replays the steps after its checkpoint. Online, log.wandb_resume=rewind cuts
        # the W&B run's history back to the checkpoint (W&B's run rewind, `resume_from`: a
        # server-side feature in preview, so opt-in); otherwise the run continues and its rows
        # carry `resumes` (this start's count), so where two rows share a step, the higher
        # `resumes` is the one that counts, as in metrics.jsonl.
        resume = {"id": run_id, "resume": "allow"}
        if log.wandb_resume == "rewind" and mode == "online" and wandb_step is not None:
            resume = {"resume_from": f"{run_id}?_step={wandb_step}"}
        self._resumes = info.get("resumes", 0)
        self.wandb = wandb.init(
            project=None if in_sweep else log.project, entity=None if in_sweep else log.entity,
            name=log.name or self.run_dir.name, group=log.group,
            tags=list(log.tags), config={**to_dict(self.cfg), "launch": info}, dir=str(self.run_dir),
            mode=mode, settings=wandb.Settings(console="off", silent=True), **resume,
        )
        id_file.write_text(run_id)
        self.wandb.define_metric("step")
        for prefix in ("train/*", "val/*", "images/*"):
            self.wandb.define_metric(prefix, step_metric="step")

    def _wandb_log(self, data: dict) -> None:
        if self.wandb is not None:
            self.wandb.log({**data, "resumes": self._resumes})

    def log_scalars(self, row: dict) -> None:
        self._guard("metrics.jsonl", self._write_row, row)
        self._guard("wandb", self._wandb_log,
                    {"step": row["step"], **{f"train/{k}": v for k, v in row.items() if k != "step"}})
        self.say(f"step {row['step']:>7d}/{row['total_steps']} ({row['progress']:.1%}) | epoch {row['epoch']} "
                 f"| loss {row['loss']:9.3f} | recon {row['recon']:9.3f} | kl {row['kl']:7.3f} "
                 f"| beta {row['beta']:.3f} | {row['img_per_s']:8.1f} img/s | ETA {_duration(row['eta_s'])} "
                 f"| data wait {row['data_wait']:.0%}" + (f" | MFU {row['mfu']:.1%}" if "mfu" in row else "")
                 + (f" | skipped {row['skipped']} non-finite" if row.get("skipped") else ""))
        if self._bar is not None:
            self._bar.update(row["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{row['loss']:.1f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)

    def log_eval(self, row: dict) -> None:
        self._guard("metrics.jsonl", self._write_row, row)
        self._guard("wandb", self._wandb_log, {"step": row["step"], **{f"val/{k}": v for k, v in row.items()
                                                                       if k not in ("step", "split")}})
        self.say(f"eval {row['step']:>7d} | loss {row['loss']:9.3f} | recon {row['recon']:9.3f} | kl {row['kl']:7.3f} "
                 + (f"| {row['bpd']:.3f} bits/dim (σ {row['sigma']:.4f}) " if "bpd" in row else "")
                 + f"| PSNR {row['psnr']:.2f} dB")

    def _write_row(self, row: dict) -> None:
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", buffering=1)
        # strict JSON (jq, browsers): a value that is not finite (NaN: no good step to average) is null
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self._metrics.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")

    def maybe_images(self, step: int, model, final: bool = False) -> None:
        if (final or step % self.cfg.log.image_every == 0) and self.folder_lost() is None:
            # (a lost folder is not made again by a picture: the next sync point stops the run)
            self._guard("pictures", self._images, step, model, final)
            self._last_image_step = step

    def _fixed_images(self):
        """The first val images of rank 0's part: the same every time, so pictures compare."""
        if self._fixed is None:
            n = self.cfg.log.num_images * 2
            xs, ys = [], []
            for x, y in self.val_loader.epoch(0):
                xs.append(unit_float(x))
                ys.append(y)
                if sum(t.shape[0] for t in xs) >= 1000:
                    break
            xs, ys = torch.cat(xs), torch.cat(ys)
            self._fixed, self._scatter = xs[:n].clone(), (xs[:1000].clone(), ys[:1000].clone())
        return self._fixed, self._scatter

    def _images(self, step: int, model, final: bool) -> None:
        paths = {}
        if step != self._last_image_step:  # the final set may fall on an image_every step
            fixed, (xs, ys) = self._fixed_images()
            paths = viz.picture_set(model, fixed, self.image_dir, suffix=f"_step{step:07d}", scatter=(xs, ys, self.class_names))
            model.train()
        if final:
            curve = viz.loss_curves(self.metrics_path, self.image_dir / "loss_curves.png")
            if curve:
                paths["loss_curves"] = curve
        if self.wandb is not None:
            import wandb

            self._guard("wandb", self._wandb_log,
                        {"step": step, **{f"images/{k}": wandb.Image(str(p)) for k, p in paths.items()}})

    def on_checkpoint(self, path: Path) -> None:
        self.say(f"checkpoint: {path}")

    def checkpoint_state(self) -> dict:
        # the W&B step the next row gets: where log.wandb_resume=rewind cuts the run back to
        step = self._guard("wandb", lambda: self.wandb.step) if self.wandb is not None else None
        return {"wandb_step": step} if step is not None else {}

    def detach(self) -> None:
        self._failed |= {"metrics.jsonl", "pictures"}
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def close(self, weights: Path | None = None, failed: bool = False, stopped_by: int = 0) -> None:
        """Flushes metrics.jsonl and finishes the W&B run, once: marked failed after an error,
        preempted after a stop signal (its requeued start resumes it under the same id)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if weights is not None:
            print(f"weights: {weights}", flush=True)
        if self.wandb is not None:
            if stopped_by:
                self._guard("wandb", self.wandb.mark_preempting)
            code = 128 + stopped_by if stopped_by else 1 if failed else 0
            self._guard("wandb", self.wandb.finish, exit_code=code)
            self.wandb = None
