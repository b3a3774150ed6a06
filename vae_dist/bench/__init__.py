"""`vae-dist bench data|step|e2e|comm`: throughput in images/second, measured side by side.

One module per benchmark (data.py, step.py, e2e.py, comm.py) and one for what they share
(common.py: the timing method, the environment, the table, the plot, the JSON).
"""

from __future__ import annotations

# `bench step`'s batch sweep without --batch-sizes (here, where --help reads it without torch)
GPU_BATCH_SIZES, CPU_BATCH_SIZES = "64,256,1024,4096", "64"


def run_bench(args) -> int:
    from vae_dist.bench.common import sample_shards, write_partial, write_report
    from vae_dist.files import output_dir, output_file

    # before minutes of measuring: an output that cannot be written (a read-only folder) ends it now
    for path, what in ((args.json, "bench --json file"), (args.plot, "bench --plot file")):
        if path:
            output_file(path, what)
    if args.profile:
        output_dir(args.profile, "bench --profile folder")
    shards, images_root, extra = args.shards, args.images, {}
    if args.what in ("data", "e2e") and shards is None:
        shards, made_root = sample_shards(args.tiny)
        images_root = images_root or made_root
    if args.what == "data":
        from vae_dist.bench.data import bench_data

        results = bench_data(args, shards, images_root)
    elif args.what == "step":
        from vae_dist.bench.step import bench_step

        results = bench_step(args, on_row=lambda rows: write_partial(args.what, shards, rows, args.json))
    elif args.what == "comm":
        from vae_dist.bench.comm import bench_comm

        results, extra = bench_comm(args)
    else:
        from vae_dist.bench.e2e import bench_e2e

        results = bench_e2e(args, shards, images_root,
                            on_row=lambda rows: write_partial(args.what, shards, rows, args.json))
    write_report(args.what, shards, results, args.json, args.plot, extra)
    return 0
