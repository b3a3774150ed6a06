"""The seed's pictures, from a live model or any checkpoint: reconstructions, prior samples,
latent interpolations, a traversal of the most-used latent dims, the latent space in 2-D,
and loss curves from metrics.jsonl. Images are PNG grids (torchvision), plots matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from vae_dist.losses import kl_per_dim
from vae_dist.model import VAE


def _save(grid: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


@torch.no_grad()
def reconstruction_grid(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Originals in the top row, their reconstructions (z = posterior mean) below."""
    mu, _ = model.encode(x)
    return make_grid(torch.cat([x, model.decode(mu)]).float().cpu(), nrow=x.shape[0], padding=2)


@torch.no_grad()
def sample_grid(model: VAE, n: int = 64, seed: int = 0) -> torch.Tensor:
    """n images from the prior with fixed noise, so grids compare across steps and runs."""
    imgs = model.sample(n, generator=torch.Generator().manual_seed(seed))
    return make_grid(imgs.float().cpu(), nrow=int(n**0.5), padding=2)


@torch.no_grad()
def interpolation_grid(model: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """One row per pair: x_a, `steps` decoded points from mu(x_a) to mu(x_b), x_b."""
    mid = model.interpolate(x_a, x_b, steps)  # (B, steps, C, H, W)
    rows = torch.cat([x_a.unsqueeze(1), mid, x_b.unsqueeze(1)], dim=1)
    return make_grid(rows.flatten(0, 1).float().cpu(), nrow=steps + 2, padding=2)


@torch.no_grad()
def traversal_grid(model: VAE, x: torch.Tensor, dims: int = 8, steps: int = 9,
                   span: float = 3.0) -> tuple[torch.Tensor, list[int], list[float], list[float]]:
    """Rows: the `dims` latent dims with the highest KL over x (the ones the model uses), most KL
    first; columns: that dim set to `steps` values from -span to +span (the prior's σ is 1), the
    other dims at the first image's posterior mean. Returns the grid, the dims, their KL
    (nats/image) and the values."""
    mu, logvar = model.encode(x)
    kl = kl_per_dim(mu, logvar)
    top = kl.argsort(descending=True)[:dims]
    values = torch.linspace(-span, span, steps, device=mu.device)
    z = mu[:1].repeat(len(top) * steps, 1)
    for r, d in enumerate(top.tolist()):
        z[r * steps:(r + 1) * steps, d] = values
    grid = make_grid(model.decode(z).float().cpu(), nrow=steps, padding=2)
    return grid, top.tolist(), kl[top].tolist(), values.tolist()


def traversal_figure(model: VAE, x: torch.Tensor, dims: int = 8, steps: int = 9, span: float = 3.0):
    """The traversal grid with what its rows and columns are: each row names its latent dim and
    that dim's KL, each column the value the dim is set to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, top, kls, values = traversal_grid(model, x, dims, steps, span)
    size, pad = x.shape[-1], 2  # make_grid's cells: pad, then an image, on every side
    fig, ax = plt.subplots(figsize=(grid.shape[2] / 100 + 2.6, grid.shape[1] / 100 + 1.4), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    centres = [pad + i * (size + pad) + size / 2 for i in range(max(len(top), len(values)))]
    ax.set_xticks(centres[:len(values)], [f"{v:+.3g}" if v else "0" for v in values])
    ax.set_yticks(centres[:len(top)], [f"z[{d}]  KL {k:.2f}" for d, k in zip(top, kls)])
    ax.tick_params(length=0)
    ax.set_xlabel(f"value of the row's latent dim, -{span:g} to +{span:g} (prior σ = 1); the other dims: "
                  "the first image's mean", fontsize=8)
    ax.set_ylabel("latent dim (most KL first)")
    ax.set_title("latent traversal")
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def latent_scatter(mu: torch.Tensor, labels: torch.Tensor, path: Path, class_names: list[str] | None = None,
                   title: str = "latent means, 2-D PCA") -> Path:
    """Posterior means projected on their first two principal components, coloured by class (one
    colour, and the title says so, where the shards hold no classes: a flat folder of images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mu = mu.float().cpu()
    centered = mu - mu.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    xy = (centered @ v[:2].T).numpy()
    labels = labels.cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    classes = sorted(set(labels.tolist()))
    if classes == [-1]:
        title += " (no classes in the data: one colour)"
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
        labelled = 1 < len(classes) <= 20 or (len(classes) == 1 and c >= 0)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=name if labelled else None)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=6, markerscale=2, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def read_metrics(metrics_path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """metrics.jsonl's train rows and val rows, each by step (a resumed run's metrics go forward
    only; should a step repeat, the later row counts)."""
    text = Path(metrics_path).read_text() if Path(metrics_path).is_file() else ""
    rows = [row for row in map(_row, text.splitlines()) if row is not None]
    train = {r["step"]: r for r in rows if r.get("split") is None}
    val = {r["step"]: r for r in rows if r.get("split") == "val"}
    return train, val


def _row(line: str) -> dict | None:
    """One metrics.jsonl row, its nulls (a value that was not finite, e.g. the loss of a window of
    skipped steps) as NaN, which a curve leaves out; None for a line that does not parse (a crash's
    torn last line) or is not a logged step."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        return None
    return {k: float("nan") if v is None else v for k, v in row.items()}


# Below this many points a curve shows each one as a marker: a short run (a small data set, a
# few log points) has one or two train rows, and a line through one point draws nothing at all.
FEW_POINTS = 30


def _curve(ax, rows: dict[int, dict], key: str, label: str, **style):
    """The `key` of `rows` against the step, as one line labelled `label` (which names the key);
    markers where it has few points; rows without the key (older runs, other settings) left out."""
    steps = [s for s in sorted(rows) if key in rows[s]]
    if len(steps) < FEW_POINTS:
        style.setdefault("marker", "o")
        style.setdefault("markersize", 4)
    return ax.plot(steps, [rows[s][key] for s in steps], label=label, **style)


# The objective panel's unit, by loss.recon: `loss` is recon + β·KL, recon in the unit of its kind
# and the KL in nats per image (README, What a run logs)
OBJECTIVE_UNITS = {"sum": "sum of squares / image (+ β·KL, nats)",
                   "mean": "squared error / subpixel (+ β·KL, nats / image)",
                   "gaussian": "nats / image"}


def _run_recon(metrics_path: Path) -> str | None:
    """loss.recon of the run whose metrics.jsonl this is (its config.yaml beside it, read as every
    config file is), None where unknown: no file, not a config, or no such key."""
    from vae_dist.config import load_yaml
    from vae_dist.errors import ConfigError

    try:
        recon = load_yaml(Path(metrics_path).parent / "config.yaml").get("loss.recon")
    except ConfigError:
        return None
    return recon if isinstance(recon, str) and recon in OBJECTIVE_UNITS else None


def loss_curves_figure(train: dict[int, dict], val: dict[int, dict], recon: str | None = None):
    """Four panels against the step: the training objective (train and val `loss`, with the
    train `recon` term), the KL term, the val bits/dim (the negative ELBO under the discretized
    decoder: the likelihood to compare runs by) and the KL weight beta. Every curve's label
    names the metrics.jsonl key it plots; a curve of few points marks each one. `recon`: the run's
    loss.recon, which gives the objective its unit (unknown: the README's "objective / image")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (objective, kl, bpd, beta) = plt.subplots(1, 4, figsize=(17, 3.6), dpi=110)
    _curve(objective, train, "loss", "train loss")
    _curve(objective, train, "recon", "train recon")
    if val:
        _curve(objective, val, "loss", "val loss", marker="o")
    objective.set_yscale("log")
    objective.set_title("training objective (loss)")
    objective.set_ylabel(OBJECTIVE_UNITS.get(recon, "objective / image (recon + β·KL)"))
    _curve(kl, train, "kl", "train kl")
    if val:
        _curve(kl, val, "kl", "val kl", marker="o")
    kl.set_title("KL(q(z|x) || p(z))")
    kl.set_ylabel("nats / image")
    if any("bpd" in row for row in val.values()):
        _curve(bpd, val, "bpd", "val bpd", marker="o", color="C2")
    else:
        bpd.text(0.5, 0.5, "no val rows yet", ha="center", va="center", transform=bpd.transAxes)
    bpd.set_title("val bits/dim: the -ELBO, lower is better")
    bpd.set_ylabel("bits / subpixel")
    _curve(beta, train, "beta", "train beta", color="C3")
    beta.set_title("KL weight beta")
    for ax in (objective, kl, bpd, beta):
        ax.set_xlabel("step")
        if ax.get_lines():
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curves(metrics_path: Path, path: Path) -> Path | None:
    """The loss-curve picture of a run's metrics.jsonl (None while it has no train row)."""
    train, val = read_metrics(metrics_path)
    if not train:
        return None
    return _save_figure(loss_curves_figure(train, val, _run_recon(metrics_path)), path)


def picture_set(model: VAE, images: torch.Tensor, out_dir: Path, suffix: str = "",
                scatter: tuple[torch.Tensor, torch.Tensor, list[str] | None] | None = None) -> dict[str, Path]:
    """Writes the standard pictures for `images` (fixed val images) into out_dir."""
    model.eval()
    n = images.shape[0]
    half = max(1, n // 2)
    x = images.to(next(model.parameters()).device)
    paths = {
        "reconstructions": _save(reconstruction_grid(model, x), out_dir / f"reconstructions{suffix}.png"),
        "samples": _save(sample_grid(model), out_dir / f"samples{suffix}.png"),
        "interpolations": _save(interpolation_grid(model, x[:half], x[half:2 * half] if n > 1 else x[:1]),
                                out_dir / f"interpolations{suffix}.png"),
        "traversal": _save_figure(traversal_figure(model, x), out_dir / f"traversal{suffix}.png"),
    }
    if scatter is not None:
        xs, ys, names = scatter
        with torch.no_grad():
            mus = torch.cat([model.encode(xs[i:i + 256].to(x.device))[0] for i in range(0, xs.shape[0], 256)])
        paths["latent_space"] = latent_scatter(mus, ys, out_dir / f"latent_space{suffix}.png", names)
    return paths


def viz_checkpoint(ckpt_path: str, out: str, shards: str | None = None, num_images: int = 8) -> list[Path]:
    """`vae-dist viz`: the pictures from a checkpoint folder, run folder or weights file."""

    from vae_dist.checkpoint import find_weights, load_weights
    from vae_dist.config import DataConfig
    from vae_dist.data.loaders import check_model_fits_shards, decode_split
    from vae_dist.data.shards import ShardSet
    from vae_dist.errors import UserError
    from vae_dist.files import output_dir, writing
    from vae_dist.inference import run_shards

    if num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}")
    weights = find_weights(ckpt_path)
    model = load_weights(weights)
    shards = run_shards(weights, shards, "for real images")
    shard_set = ShardSet.open(shards)
    check_model_fits_shards(model.cfg, shard_set, weights)
    output_dir(out, "viz output folder")  # once the inputs are known good: a failure makes nothing
    split = "val" if shard_set.count("val") else "train"
    images, labels = decode_split(shard_set, DataConfig(shards=shards, num_threads=1), split, torch.device("cpu"))
    n = min(num_images * 2, images.shape[0])
    x = images[:n].float() / 255
    keep = min(2000, images.shape[0])
    xs = images[:keep].float() / 255
    with writing(out, "viz output folder"):
        paths = picture_set(model, x, Path(out), scatter=(xs, labels[:keep], list(shard_set.class_names)))
        run_metrics = weights.parent / "metrics.jsonl"
        if run_metrics.is_file():
            curve = loss_curves(run_metrics, Path(out) / "loss_curves.png")
            if curve:
                paths["loss_curves"] = curve
    return list(paths.values())
