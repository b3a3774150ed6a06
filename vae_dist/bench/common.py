"""What the benchmarks share: the timing method, the environment, the table, the plot, the JSON.

Method (every benchmark): warm-up iterations excluded (compile, pipeline start, caches),
the device synchronized before each clock read, the median of `--repeats` timed windows.
Results go to a printed table and, with --json, to the JSON of DESIGN.md:
{"device": ..., "env": {...}, "results": [{"name", "img_per_s", "batch_size", "steps", ...}]}.
A configuration that cannot be measured says why in its row; the other rows are measured.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from vae_dist.errors import UserError
from vae_dist.files import write_atomic, writing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_window, repeats: int) -> tuple[float, list[float]]:
    """Median over repeats of images/second; run_window() returns (images, seconds)."""
    rates = []
    for _ in range(repeats):
        images, seconds = run_window()
        rates.append(images / seconds)
    return statistics.median(rates), rates


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "platform": platform.platform()}
    for mod in ("nvidia.dali", "accelerate", "webdataset", "torchvision"):
        try:
            env[mod.split(".")[-1]] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            env[mod.split(".")[-1]] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def sample_shards(tiny: bool) -> tuple[str, str]:
    """(shard folder, extracted root) of the sample set, packed once into a temp folder."""
    from vae_dist.data.pack import PackOptions, pack
    from vae_dist.data.sample import make_sample_dataset

    root = Path(tempfile.mkdtemp(prefix="vae-dist-bench-"))
    per_class = (20, 5) if tiny else (1000, 50)  # 10k images: ~40 batches of 256 per epoch
    src = make_sample_dataset(root / "tiny-sample", per_class[0], per_class[1], test_count=0)
    pack(src, root / "shards", PackOptions(shard_size=100 if tiny else 1000))
    return str(root / "shards"), str(src)


def model_cfg(tiny: bool, image_size: int = 64):
    """The seed VAE (or a tiny one with as many layers) for `image_size` x `image_size` inputs."""
    from vae_dist.model import VAEConfig

    if tiny:
        return VAEConfig(widths=(8, 16, 16, 32), latent_dim=16, image_size=image_size)
    return VAEConfig(image_size=image_size)


def memory(device: torch.device) -> dict:
    """Host RSS of this process and its children (DataLoader workers), and GPU memory in use."""
    def rss(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        except (OSError, StopIteration):
            return 0.0

    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    out = {"rss_mib": rss(os.getpid()) + sum(rss(c) for c in children)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["gpu_mem_mib"] = (total - free) / 2**20
    return out


def row_or_reason(name: str, measure) -> dict:
    """One benchmark row; a configuration that cannot be measured says why in its row, and
    the other rows are still measured."""
    try:
        return measure()
    except UserError as e:
        return {"name": name, "unavailable": str(e)}
    except Exception as e:  # noqa: BLE001 - a failing configuration is a result, not a crash
        # DataLoader workers wrap the cause in a traceback: its last line names it
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return {"name": name, "unavailable": f"failed: {lines[-1] if lines else type(e).__name__}"}


def title(what: str, extra: dict | None = None) -> str:
    """The table's and the plot's title: the benchmark, the device, and the image size where
    the benchmark chose it (`bench step --image-size`)."""
    size = (extra or {}).get("image_size")
    return f"vae-dist bench {what} on {device_name()}" + (f", {size}x{size} images" if size else "")


def print_table(what: str, results: list[dict], extra: dict | None = None) -> None:
    print(f"\n{title(what, extra)}")
    w = max([48] + [len(r["name"]) for r in results])
    print(f"{'configuration':<{w}} {'img/s':>12} {'batch':>6} {'steps':>6}  notes")
    for r in results:
        if "unavailable" in r:
            why = r["unavailable"] if r["unavailable"].startswith("failed") else f"unavailable: {r['unavailable']}"
            print(f"{r['name']:<{w}} {'-':>12} {'':>6} {'':>6}  {why}")
            continue
        notes = []
        if "prefetch_depth" in r and "batch_size" in r:  # a loader beside a URL (bench/remote.py): its link, its need
            notes.append(link_note(r))
        if "data_wait" in r:
            notes.append(f"data wait {r['data_wait']:.0%}")
        if "build_s" in r:
            notes.append(f"built in {r['build_s']:.1f} s")
        if "rss_mib" in r:
            notes.append(f"RSS {r['rss_mib']:,.0f} MiB" + (f", GPU {r['gpu_mem_mib']:,.0f} MiB" if "gpu_mem_mib" in r else ""))
        if "tflop_per_s" in r:
            notes.append(f"{r['tflop_per_s']:.2f} TFLOP/s")
        if "mfu" in r:
            notes.append(f"{r['mfu']:.1%} of peak")
        if r.get("compile"):
            notes.append(f"{r['compiled_graphs']} graphs in {r['warmup_s']:.0f} s")
        if "exposed_comm_ms" in r:
            notes.append(f"step {r['step_ms']:.0f} ms = compute {r['compute_ms']:.0f} + exposed all-reduce "
                         f"{r['exposed_comm_ms']:.0f}; alone {r['alone_ms']:.0f} ms"
                         + (f", {r['overlap']:.0%} hidden" if r.get("overlap") is not None else ""))
        if "note" in r:
            notes.append(r["note"])
        if "profile" in r:
            notes.append(f"bound by {r['profile']['bound_by']}")
        print(f"{r['name']:<{w}} {r['img_per_s']:>12,.1f} {r.get('batch_size', ''):>6} {r.get('steps', ''):>6}  "
              f"{', '.join(notes)}")


def link_note(r: dict) -> str:
    """A row's link columns as words: the link's MB/s, the prefetch depth, the wait on the link,
    and the MB/s a link must carry at the row's speed."""
    if r.get("link_mb_s") is None:
        said = "local disk"
    else:
        said = f"link {r['link_mb_s']:,.1f} MB/s, prefetch {r['prefetch_depth']}"
        if r.get("link_wait_s") is not None:
            said += f", waited {r['link_wait_s']:.2f} s on it"
    if r.get("needed_mb_s") is not None:
        said += f"; needs {r['needed_mb_s']:,.2f} MB/s"
    return said


def plot(results: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "img_per_s" in r]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2), dpi=110)
    ax.barh([r["name"] for r in rows][::-1], [r["img_per_s"] for r in rows][::-1], color="#4c72b0")
    for i, r in enumerate(rows[::-1]):
        ax.text(r["img_per_s"], i, f" {r['img_per_s']:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("images / second (median)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_partial(what: str, shards: str | None, results: list[dict], json_path: str | None) -> None:
    """The JSON so far, marked partial, after each row: a run killed at its time limit keeps
    the rows it measured (write_report replaces it at the end)."""
    if json_path:
        report = {"device": device_name(), "env": environment(), "benchmark": what, "shards": shards,
                  "results": results, "partial": True}
        _write_json(json_path, report)


def _write_json(json_path: str, report: dict) -> None:
    """The report at `json_path`, whole or not at all (a reader never sees half a file)."""
    with writing(json_path, "bench --json file"):
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(json_path), json.dumps(report, indent=1).encode())


def write_report(what: str, shards: str | None, results: list[dict], json_path: str | None, plot_path: str | None,
                 extra: dict | None = None) -> None:
    """The table on stdout; the JSON (with a benchmark's `extra` keys) and the plot where asked for."""
    report = {"device": device_name(), "env": environment(), "benchmark": what, "shards": shards, "results": results,
              **(extra or {})}
    print_table(what, results, extra)
    if json_path:
        _write_json(json_path, report)
        print(f"results: {json_path}")
    if plot_path:
        with writing(plot_path, "bench --plot file"):
            plot(results, title(what, extra), plot_path)
        print(f"plot: {plot_path}")
