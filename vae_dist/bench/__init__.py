"""`vae-dist bench data|step|e2e|comm`: throughput in images/second, measured side by side.

One module per benchmark (data.py, step.py, e2e.py, comm.py) and one for what they share
(common.py: the timing method, the environment, the table, the plot, the JSON).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# `bench step`'s batch sweep without --batch-sizes (here, where --help reads it without torch)
GPU_BATCH_SIZES, CPU_BATCH_SIZES = "64,256,1024,4096", "64"

KINDS = {
    "data": "the loaders alone: DALI (mixed and CPU decode), webdataset, the seed's ImageFolder, the cache",
    "step": "the training step alone on synthetic batches: eager/compiled, fp32/bf16, channels_last, batch sizes",
    "e2e": "real training steps from shards (the Trainer) beside the seed's own loop",
    "comm": "DDP's gradient all-reduce with N processes: compute vs exposed all-reduce, for each DDP knob "
            "(the default, --world 2,4 at the seed's size, took 12 minutes on an idle 2-core CPU, --world 2 "
            "alone 3.6; a line says as each part starts and ends)",
}


def kind_first(argv: list[str]) -> list[str]:
    """`vae-dist bench --tiny step ...` as `vae-dist bench step --tiny ...`: the options given
    before the kind go after it, where each kind's own parser reads them (and names any that
    kind does not take)."""
    if argv[:1] != ["bench"] or not argv[1:2] or not argv[1].startswith("-") or argv[1] in ("-h", "--help"):
        return argv
    kind = next((i for i, word in enumerate(argv) if word in KINDS), None)
    if kind is None:
        return argv
    return ["bench", argv[kind], *argv[1:kind], *argv[kind + 1:]]


def add_bench_args(parser, formatter_class=None) -> None:
    """`vae-dist bench KIND [options]`: each kind its own parser, so `bench KIND --help` lists
    the options that kind reads (and the ones every kind shares), each with its own default."""
    sub = parser.add_subparsers(dest="what", required=True, metavar="{" + ",".join(KINDS) + "}",
                                help="the benchmark (`vae-dist bench KIND --help`: its options)")
    for kind, summary in KINDS.items():
        p = sub.add_parser(kind, help=summary, description=f"vae-dist bench {kind}: {summary}.",
                           formatter_class=formatter_class or parser.formatter_class)
        _add_kind_args(p, kind)
        for name in ("shards", "images", "profile", "config", "world", "prefetch"):  # what the shared code reads, unset
            p.set_defaults(**{name: None})


def _add_kind_args(p, kind: str) -> None:
    on = kind  # which kind these options are for
    if on in ("data", "e2e"):
        p.add_argument("--shards", metavar="DIR|URL", help="shard folder, or an http(s):// or s3:// URL of one: "
                       "then the set is fetched whole once into a temp folder (a row: the link's rate) and each "
                       "streaming row is measured from that local copy and streaming from the URL (default: the "
                       "sample set, made in a temp folder and removed at the end)")
        p.add_argument("--prefetch", type=int, default=None, metavar="N",
                       help="--shards URL: shards fetched ahead of use by a streaming row (default: "
                            f"{_default_prefetch()}, data.shard_prefetch's)")
        p.add_argument("--images", metavar="DIR", help="extracted Tiny ImageNet root for the seed's ImageFolder "
                       "baseline (default: the sample set's source images when --shards is not given)")
    if on in ("data", "e2e", "comm"):
        default = {"data": "256", "e2e": "64, or the --config file's train.batch_size", "comm": "32"}[on]
        p.add_argument("--batch-size", type=int, default=None,
                       help=("per-process micro-batch" if on == "comm" else "images per batch") + f" (default: {default})")
    if on in ("step", "e2e"):
        default = (f"{GPU_BATCH_SIZES} on a GPU, {CPU_BATCH_SIZES} on a CPU" if on == "step" else "--batch-size")
        p.add_argument("--batch-sizes", default=None, metavar="LIST",
                       help=f"comma list of batch sizes, one set of rows each (default: {default})")
    if on == "step":
        p.add_argument("--rows", default=None, metavar="LIST",
                       help="the rows to measure, in order, as MODE:DTYPE:BATCH (MODE eager, default, "
                            "reduce-overhead, graph = compiled + the whole step as one CUDA graph); wins over "
                            "--batch-sizes, --dtypes, --compile")
        p.add_argument("--image-size", type=int, default=64, help="height and width of the synthetic batches "
                       "(the model is built for them), as `pack --image-size`")
        p.add_argument("--dtypes", default=None, metavar="LIST",
                       help="comma list of fp32,bf16 (default: fp32,bf16 on a GPU, fp32 on a CPU)")
        p.add_argument("--compile", choices=["both", "on", "off"], default="both", help="torch.compile rows")
    if on in ("step", "e2e"):
        p.add_argument("--compile-mode", default="default",
                       choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                       help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs)")
    if on == "step":
        p.add_argument("--channels-last", choices=["both", "on", "off"], default="both", help="channels_last rows")
        p.add_argument("--profile", default=None, metavar="DIR",
                       help="a torch.profiler trace and summary of each row's steps into this folder")
    if on == "e2e":
        p.add_argument("--variants", default=None, metavar="LIST",
                       help="comma list of seed,fast,cache,graph (cache: the decoded split in GPU memory, RAM on "
                            "a CPU; graph: cache + a whole-step CUDA graph; default: seed,fast,cache on a GPU, "
                            "seed,fast on a CPU)")
        p.add_argument("--config", default=None, metavar="FILE",
                       help="a config file for the Trainer's rows (e.g. launch/configs/throughput.yaml); its "
                            "train.batch_size is the default batch; the bench's own settings win")
    if on == "comm":
        p.add_argument("--world", default=None, metavar="LIST",
                       help="comma list of process counts, one accelerate launch each (default: 2,4: "
                            "12 minutes on an idle 2-core CPU, where --world 2 alone took 3.6)")
    if on in ("data", "e2e"):
        p.add_argument("--threads", type=int, default=None, help="decode threads = loader workers (default: all cores)")
    elif on == "comm":
        p.add_argument("--threads", type=int, default=None,
                       help="threads per process (default: the cores divided by the process count)")
    # shared by every kind
    steps = {"data": "50", "step": "30 on a GPU, 10 on a CPU", "e2e": "60 on a GPU, 20 on a CPU", "comm": "3"}[on]
    warmup = {"data": "5", "step": "10 on a GPU, 3 on a CPU", "e2e": "20 on a GPU, 5 on a CPU", "comm": "2"}[on]
    p.add_argument("--steps", type=int, default=None, help=f"timed batches or steps per repeat (default: {steps})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed batches or steps before timing (default: {warmup})")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--json", metavar="FILE", help="write the results JSON to this file (its folder is made)")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart (PNG) of img/s per configuration to this file")
    p.add_argument("--tiny", action="store_true", help="a tiny model and data set, for tests")


def _default_prefetch() -> int:
    from vae_dist.config import DataConfig  # no torch: --help reads it

    return DataConfig.shard_prefetch


def run_bench(args) -> int:
    from vae_dist.bench.common import sample_shards
    from vae_dist.bench.remote import open_remote_bench
    from vae_dist.data.remote import is_url
    from vae_dist.errors import UserError
    from vae_dist.files import output_dir, output_file

    # before minutes of measuring: an output that cannot be written (a read-only folder) ends it now
    for path, what in ((args.json, "bench --json file"), (args.plot, "bench --plot file")):
        if path:
            output_file(path, what)
    if args.profile:
        output_dir(args.profile, "bench --profile folder")
    shards, images_root, extra = args.shards, args.images, {}
    made = remote = None
    if args.what in ("data", "e2e") and is_url(shards):
        if args.prefetch is not None and args.prefetch < 1:
            raise UserError(f"--prefetch must be at least 1 (got {args.prefetch})")
        remote = open_remote_bench(shards, args.prefetch or _default_prefetch())
        extra = {"url": shards, "set_mb": remote.set_bytes / 1e6, "bytes_per_image": remote.bytes_per_image,
                 "prefetch": remote.depth}
        shards = remote.local
    elif args.what in ("data", "e2e") and shards is None:
        shards, made_root = sample_shards(args.tiny)
        images_root = images_root or made_root
        made = Path(shards).parent
        print(f"bench {args.what}: the sample set in {made} (removed at the end; --shards DIR measures your own)",
              flush=True)
    try:
        return _run(args, shards, images_root, extra, remote)
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if remote:
            remote.close()


def _run(args, shards, images_root, extra, remote=None) -> int:
    from vae_dist.bench.common import write_partial, write_report

    shown = remote.url if remote else shards  # what the JSON says was measured: the URL, not its temp copy
    if args.what == "data":
        from vae_dist.bench.data import bench_data

        results = bench_data(args, shards, images_root, remote)
    elif args.what == "step":
        from vae_dist.bench.step import bench_step

        results = bench_step(args, on_row=lambda rows: write_partial(args.what, shown, rows, args.json))
        extra = {"image_size": args.image_size}  # the table's title says it too
    elif args.what == "comm":
        from vae_dist.bench.comm import bench_comm

        results, extra = bench_comm(args)
    else:
        from vae_dist.bench.e2e import bench_e2e

        results = bench_e2e(args, shards, images_root, remote=remote,
                            on_row=lambda rows: write_partial(args.what, shown, rows, args.json))
    write_report(args.what, shown, results, args.json, args.plot, extra)
    return 0
