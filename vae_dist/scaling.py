"""The scale-out model of docs/scaling.md: a DDP step's time on G GPUs, from FLOPs, bytes and links.

    python -m vae_dist.scaling                 # the tables of docs/scaling.md
    python -m vae_dist.scaling --calibration docs/bench/cpu-2core/comm.json   # the model vs bench comm

One step of one GPU: compute t_c = t0 + B * F / R (F = training FLOPs per image, R = achieved
FLOP/s, t0 = the per-step floor of launching the kernels). DDP all-reduces the gradient in
buckets, each as soon as the backward pass has produced its last gradient (the buckets are
filled in reverse parameter order, the order the backward pass produces them); an all-reduce
of S bytes over G ranks takes t = a + S * 2(G-1)/G / busbw (NCCL's bus bandwidth: the ring
algorithm moves 2(G-1)/G of the bytes through every link), with busbw that of NVLink inside
a node and that of the node's NICs across nodes. All-reduces run one after another on one
stream; what is left of them when the backward pass ends is exposed. With accumulation
(k micro-batches), compute is k * t_c and only the last micro-batch's backward hides the
all-reduce. Scaling efficiency = t_c * k / t_step: the share of the step spent computing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace

FIRST_BUCKET_MB = 1  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES: DDP's first bucket is small, to start early
BACKWARD_SHARE = 2 / 3  # of a step's FLOPs: the backward pass does twice the forward's


@dataclass(frozen=True)
class Gpu:
    """One H100 SXM's step: the numbers docs/scaling.md assumes (bench step replaces them)."""
    achieved_flops: float = 250e12  # FLOP/s the seed VAE's compiled bf16 step reaches (assumed: 25% of 989 TF)
    step_floor_s: float = 0.5e-3  # per-step launch floor of the compiled step (assumed)


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int = 8
    nvlink_busbw: float = 360e9  # B/s all-reduce bus bandwidth inside an 8x H100 node (80% of NVLink 4's 450 GB/s a way)
    network_busbw: float = 340e9  # B/s across nodes: 8 x 400 Gb/s NICs = 400 GB/s a node, at 85% (nccl-tests #119)
    latency_node_s: float = 15e-6  # all-reduce latency inside a node
    latency_hop_s: float = 5e-6  # added per node the ring crosses


def buckets(param_bytes: list[int], cap_mb: float) -> list[tuple[int, int]]:
    """DDP's buckets as (bytes, index of the last parameter in backward order), parameters taken
    in reverse order: the first closes past 1 MiB, the others past cap_mb."""
    out, size, cap = [], 0, FIRST_BUCKET_MB * 2**20
    order = list(reversed(param_bytes))
    for i, nbytes in enumerate(order):
        size += nbytes
        if size >= cap or i == len(order) - 1:
            out.append((size, i))
            size, cap = 0, cap_mb * 2**20
    return out


def allreduce_s(nbytes: float, gpus: int, cluster: Cluster) -> float:
    if gpus == 1:
        return 0.0
    nodes = -(-gpus // cluster.gpus_per_node)
    busbw = cluster.nvlink_busbw if nodes == 1 else min(cluster.nvlink_busbw, cluster.network_busbw)
    latency = cluster.latency_node_s + cluster.latency_hop_s * (nodes - 1)
    return latency + nbytes * 2 * (gpus - 1) / gpus / busbw


def step_time(*, batch: int, gpus: int, flops_per_image: float, param_bytes: list[int], backward_flops: list[float],
              gpu: Gpu, cluster: Cluster, wire_bytes: int = 4, accum: int = 1, bucket_mb: float = 25,
              overlap: bool = True) -> dict:
    """One optimizer step on `gpus` GPUs at `batch` images per GPU and micro-batch. param_bytes
    (fp32) and backward_flops per parameter in forward order; wire_bytes: 4 fp32, 2 bf16/fp16.
    overlap=False: no all-reduce starts before the backward pass ends (the bound a machine
    without a separate engine for communication meets: a CPU, whose cores run both)."""
    compute = gpu.step_floor_s + batch * flops_per_image / gpu.achieved_flops
    backward = compute * BACKWARD_SHARE if overlap else 0.0
    backward_start = compute * accum - backward  # the last micro-batch's backward
    done = [0.0]
    for f in reversed(backward_flops):  # gradients become ready in reverse order
        done.append(done[-1] + f)
    total_flops = done[-1]
    end = 0.0
    for nbytes, last in buckets(param_bytes, bucket_mb):
        ready = backward_start + backward * done[last + 1] / total_flops
        end = max(end, ready) + allreduce_s(nbytes * wire_bytes / 4, gpus, cluster)
    step = max(compute * accum, end)
    return {"compute_s": compute * accum, "step_s": step, "exposed_s": step - compute * accum,
            "img_per_s": batch * accum * gpus / step, "efficiency": compute * accum / step}


def vae_profile(vae_cfg=None) -> dict:
    """The seed VAE's numbers for the model: training FLOPs per image, bytes and backward FLOPs
    per parameter (a layer's backward FLOPs go to its weight; its bias gets none)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vae_dist.flops import train_flops_per_image
    from vae_dist.model import VAE, VAEConfig

    cfg = vae_cfg or VAEConfig()
    with torch.device("meta"):
        model = VAE(cfg)
        x = torch.rand(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    per_module = counter.get_flop_counts()
    flops = [2 * sum(per_module.get(f"VAE.{n.rsplit('.', 1)[0]}", {}).values()) if n.endswith("weight") else 0.0
             for n, _ in model.named_parameters()]
    return {"flops_per_image": train_flops_per_image(cfg), "param_bytes": [p.numel() * 4 for p in model.parameters()],
            "backward_flops": flops}


# -- the tables of docs/scaling.md -----------------------------------------------------------------
GPU_COUNTS = (1, 8, 16, 64, 256)
BATCHES = (64, 512, 4096)


def table(profile: dict, gpu: Gpu, cluster: Cluster, *, wire_bytes: int, accum: int = 1) -> list[str]:
    head = "| GPUs | " + " | ".join(f"batch {b}: img/s, efficiency (no overlap)" for b in BATCHES) + " |"
    lines = [head, "|" + "---|" * (len(BATCHES) + 1)]
    for g in GPU_COUNTS:
        cells = []
        for b in BATCHES:
            kw = dict(batch=b, gpus=g, gpu=gpu, cluster=cluster, wire_bytes=wire_bytes, accum=accum, **_model(profile))
            r, serial = step_time(**kw), step_time(**kw, overlap=False)
            cells.append(f"{r['img_per_s'] / 1e3:,.0f}k, {r['efficiency']:.0%} ({serial['efficiency']:.0%})")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


# bytes a training image costs on the wire when shards stream from a URL: a sample's share of
# its tar (the 64x64 JPEG, ~2.1 KB at pack's quality 95, plus ~1.8 KB of tar headers, padding
# and the 4-byte label's 512-byte block), measured on the GPU check's packed sample set
SHARD_BYTES_PER_IMAGE = 3900


def epochs_table(profile: dict, gpu: Gpu, cluster: Cluster, images: int, epochs: int = 20,
                 bytes_per_image: int = SHARD_BYTES_PER_IMAGE) -> list[str]:
    """Time to `epochs` epochs of `images` (training steps only: no compile, no data cache), and
    the shard bandwidth each node needs to stream them at that speed (img/s per node x bytes per
    image): what a link to object storage must carry when the set does not fit the shard cache."""
    lines = ["| GPUs | per-GPU batch | global batch | steps per epoch | img/s | time to 20 epochs | "
             "data per node, streamed |",
             "|---|---|---|---|---|---|---|"]
    for g in GPU_COUNTS:
        for b in BATCHES:
            if b * g > images // 4:  # fewer than 4 steps an epoch: not a training run
                continue
            r = step_time(batch=b, gpus=g, gpu=gpu, cluster=cluster, wire_bytes=2, **_model(profile))
            steps = images // (b * g)
            nodes = -(-g // cluster.gpus_per_node)
            per_node = r["img_per_s"] / nodes * bytes_per_image
            lines.append(f"| {g} | {b} | {b * g:,} | {steps:,} | {r['img_per_s'] / 1e3:,.0f}k | "
                         f"{steps * epochs * r['step_s']:.1f} s | {per_node / 1e9:.2f} GB/s "
                         f"({per_node * 8 / 1e9:.0f} Gb/s) |")
    return lines


def _model(profile: dict) -> dict:
    return {k: profile[k] for k in ("flops_per_image", "param_bytes", "backward_flops")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vae_dist.scaling", description="the tables of docs/scaling.md")
    p.add_argument("--calibration", metavar="FILE", help="a `vae-dist bench comm` JSON: the model's exposed "
                   "all-reduce beside the measured one, from that run's compute and all-reduce fit")
    args = p.parse_args(argv)
    profile = vae_profile()
    if args.calibration:
        return calibrate(json.loads(open(args.calibration).read()), profile)
    gpu, cluster = Gpu(), Cluster()
    default_buckets = buckets(profile["param_bytes"], 25)  # train.ddp_bucket_mb's default
    print(f"seed VAE: {profile['flops_per_image'] / 1e9:.2f} GFLOP per training image, "
          f"{sum(profile['param_bytes']) / 2**20:.1f} MiB of fp32 gradients in {len(default_buckets)} "
          f"buckets ({', '.join(f'{b / 2**20:.1f}' for b, _ in default_buckets)} MiB)")
    narrow = replace(cluster, network_busbw=45e9)
    for title, kwargs, c in (("fp32 gradients", {"wire_bytes": 4}, cluster),
                             ("bf16 gradients (train.ddp_comm_hook=bf16)", {"wire_bytes": 2}, cluster),
                             ("fp32 gradients, one 400 Gb/s NIC per node (busbw 45 GB/s)", {"wire_bytes": 4}, narrow),
                             ("bf16 gradients, one 400 Gb/s NIC per node", {"wire_bytes": 2}, narrow),
                             ("bf16, one NIC per node, train.grad_accum_steps=4", {"wire_bytes": 2, "accum": 4}, narrow)):
        print(f"\n{title}\n")
        print("\n".join(table(profile, gpu, c, **kwargs)))
    for name, images in (("Tiny ImageNet", 100_000), ("ImageNet 64x64", 1_281_167)):
        print(f"\n{name} ({images:,} train images), bf16 gradients, 20 epochs\n")
        print("\n".join(epochs_table(profile, gpu, cluster, images)))


def calibrate(report: dict, profile: dict) -> None:
    """The model against `bench comm`: for each measured step row, the exposed all-reduce the
    model predicts from that row's own compute time, bucket sizes and the run's all-reduce fit."""
    print("| processes | configuration | compute ms | exposed all-reduce ms: measured | model, overlapped | "
          "model, no overlap |")
    print("|---|---|---|---|---|---|")
    for r in report["results"]:
        if r.get("kind") != "step" or r.get("knobs", {}).get("ddp_comm_hook") == "powersgd":
            continue
        fit = report["allreduce"][str(r["world"])]["fit"]
        world = r["world"]
        per_micro = r["compute_ms"] / 1e3 / r["grad_accum_steps"]
        # this machine as the "cluster": one node, the all-reduce of the fit (its algbw is S / t)
        cluster = Cluster(gpus_per_node=world, nvlink_busbw=fit["algbw_gb_s"] * 1e9 * 2 * (world - 1) / world,
                          latency_node_s=fit["latency_ms"] / 1e3, latency_hop_s=0.0)
        gpu = Gpu(achieved_flops=float("inf"), step_floor_s=per_micro)
        wire = 2 if r.get("knobs", {}).get("ddp_comm_hook") in ("bf16", "fp16") else 4
        kw = dict(batch=r["micro_batch"], gpus=world, gpu=gpu, cluster=cluster, wire_bytes=wire,
                  accum=r["grad_accum_steps"], bucket_mb=r.get("knobs", {}).get("ddp_bucket_mb", 25), **_model(profile))
        m, serial = step_time(**kw), step_time(**kw, overlap=False)
        print(f"| {world} | {r['name'].split(': ', 1)[-1]} | {r['compute_ms']:.0f} | {r['exposed_comm_ms']:.0f} | "
              f"{m['exposed_s'] * 1e3:.0f} | {serial['exposed_s'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
