"""The `vae-dist` command. Thin: parses arguments, calls the modules, reports errors.

Every failure a user can cause ends in one line on stderr naming the cause, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from vae_dist.errors import SharedError, UserError


def _sample_data(args) -> int:
    from vae_dist.data.sample import make_sample_dataset

    out = make_sample_dataset(args.out, args.train_per_class, args.val_per_class, args.test, args.seed,
                              make_zip=args.zip)
    print(f"sample dataset written to {out}" + (f" (and {out.with_suffix('.zip')})" if args.zip else ""))
    return 0


def _pack(args) -> int:
    from vae_dist.data.pack import PackOptions, pack, summary

    splits = tuple(s for s in args.splits.split(",") if s)
    opts = PackOptions(shard_size=args.shard_size, workers=args.workers, seed=args.seed, splits=splits,
                       image_size=args.image_size, quality=args.quality, keep_source=not args.reencode)
    manifest = pack(args.src, args.out, opts)
    print(summary(manifest))
    print(f"shards and manifest.json in {args.out}")
    return 0


def _verify(args) -> int:
    from vae_dist.data.verify import verify
    from vae_dist.errors import DataError

    problems = verify(args.dir)
    for line in problems:
        print(line)
    if problems:
        n = len(problems)
        raise DataError(f"{args.dir}: {n} problem{'s' * (n > 1)} with the shards (listed above): "
                        f"pack them again from the source images")
    print(f"{args.dir}: all shards match manifest.json")
    return 0


def _train(args, rest: list[str]) -> int:
    from vae_dist.config import build_config, dump_yaml

    cfg = build_config(args.config, rest)
    if args.print_config:  # what this run would use, as config.yaml (a valid --config file)
        print(dump_yaml(cfg), end="")
        return 0
    from vae_dist.train import train

    return train(cfg)


class _TrainHelp(argparse.RawDescriptionHelpFormatter):
    """`train --help` lists every config key, generated from the config dataclasses."""

    def format_help(self) -> str:
        from vae_dist.config import config_help

        return super().format_help() + "\nconfig keys (--section.key=value or --section.key value; " \
            "defaults < --config FILE < command line):\n" + config_help() + "\n"


def _viz(args) -> int:
    from vae_dist.viz import viz_checkpoint

    paths = viz_checkpoint(args.ckpt, args.out, shards=args.shards, num_images=args.num_images)
    for p in paths:
        print(p)
    return 0


def _eval(args) -> int:
    from vae_dist.inference import evaluate_checkpoint, format_eval

    result = evaluate_checkpoint(args.ckpt, args.shards, split=args.split, iw=args.iw, json_path=args.json,
                                 calib_images=args.calib_images, batch_size=args.batch_size, seed=args.seed)
    print(format_eval(result))
    if args.json:
        print(f"results: {args.json}")
    return 0


def _sample(args) -> int:
    from vae_dist.inference import sample_images

    paths = sample_images(args.ckpt, args.out, n=args.n, seed=args.seed)
    print(f"{paths[0]} and {len(paths) - 1} single images in {args.out}")
    return 0


def _encode(args) -> int:
    from vae_dist.inference import encode_split

    print(f"posterior means, log-variances and labels: {encode_split(args.ckpt, args.shards, args.out, args.split)}")
    return 0


def _bench(args) -> int:
    from vae_dist.bench import run_bench

    return run_bench(args)


def _demo(args) -> int:
    from vae_dist.demo import run_demo

    return run_demo(args.out, steps=args.steps)


def add_bench_args(p) -> None:
    p.add_argument("what", choices=["data", "step", "e2e"])
    p.add_argument("--json", help="write the results JSON here")
    p.add_argument("--plot", help="write a bar chart (PNG) of img/s per configuration here")
    p.add_argument("--shards", help="shard folder (default: the sample set, made in a temp folder)")
    p.add_argument("--images", help="extracted Tiny ImageNet root for the ImageFolder baseline")
    p.add_argument("--batch-size", type=int, default=None, help="data/e2e batch size (data: 256, e2e: 64)")
    p.add_argument("--batch-sizes", default=None, help="step: comma list (CPU: 64; GPU: 64,256,1024)")
    p.add_argument("--threads", type=int, default=None, help="decode threads = loader workers (default: cores)")
    p.add_argument("--steps", type=int, default=None, help="timed batches/steps per repeat")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches/steps before timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default=None, help="step: comma list of fp32,bf16 (CPU: fp32)")
    p.add_argument("--compile", choices=["both", "on", "off"], default="both")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--channels-last", choices=["both", "on", "off"], default="both")
    p.add_argument("--variants", default=None, help="e2e: comma list of seed,fast,cache")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="step: a torch.profiler trace and summary of each row's steps into DIR")
    p.add_argument("--tiny", action="store_true", help="a tiny model and data set (for tests)")


def _checkpoint_arg(p) -> None:
    p.add_argument("ckpt", help="checkpoint folder, run folder or model.safetensors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-dist", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample-data", help="write the offline sample dataset (Tiny ImageNet layout)")
    s.add_argument("out")
    s.add_argument("--train-per-class", type=int, default=200)
    s.add_argument("--val-per-class", type=int, default=50)
    s.add_argument("--test", type=int, default=50, help="unlabelled test images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--zip", action="store_true", help="also write OUT.zip, as Tiny ImageNet is released")
    s.set_defaults(run=_sample_data)

    s = sub.add_parser("pack", help="Tiny ImageNet folder or .zip -> WebDataset shards + manifest.json")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--shard-size", type=int, default=5000, help="samples per tar")
    s.add_argument("--workers", type=int, default=0, help="decode processes (0: all cores)")
    s.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    s.add_argument("--splits", default="train,val", help="comma list of train,val,test")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    s.add_argument("--reencode", action="store_true", help="re-encode every image, even RGB 64x64 JPEGs")
    s.set_defaults(run=_pack)

    s = sub.add_parser("verify", help="check every shard against manifest.json")
    s.add_argument("dir")
    s.set_defaults(run=_verify)

    s = sub.add_parser("train", help="train (under `accelerate launch` for several processes)",
                       description="Config overrides follow as --section.key=value (or --section.key value).",
                       formatter_class=_TrainHelp)
    s.add_argument("--config", help="YAML file of config sections")
    s.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    s.set_defaults(run=_train, takes_overrides=True)

    s = sub.add_parser("viz", help="pictures from a checkpoint or weights file")
    _checkpoint_arg(s)
    s.add_argument("out")
    s.add_argument("--shards", help="shard folder for real images (default: the run's data.shards)")
    s.add_argument("--num-images", type=int, default=8)
    s.set_defaults(run=_viz)

    s = sub.add_parser("eval", help="bits/dim (ELBO and importance-weighted bound) and PSNR of a checkpoint")
    _checkpoint_arg(s)
    s.add_argument("--shards", required=True, help="shard folder")
    s.add_argument("--split", default="val")
    s.add_argument("--iw", type=int, default=1, help="importance samples K per image (K=1: the ELBO alone)")
    s.add_argument("--json", help="write the results JSON here")
    s.add_argument("--calib-images", type=int, default=10000, help="train images that calibrate the MSE decoder's sigma")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_eval)

    s = sub.add_parser("sample", help="images from the prior of a checkpoint: a grid and single PNGs")
    _checkpoint_arg(s)
    s.add_argument("out")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_sample)

    s = sub.add_parser("encode", help="posterior means, log-variances and labels of a split as .npz")
    _checkpoint_arg(s)
    s.add_argument("--shards", required=True, help="shard folder")
    s.add_argument("--split", default="val")
    s.add_argument("--out", required=True, help="the .npz file to write")
    s.set_defaults(run=_encode)

    s = sub.add_parser("bench", help="throughput benchmarks (images/s)")
    add_bench_args(s)
    s.set_defaults(run=_bench)

    s = sub.add_parser("demo", help="sample data -> shards -> short training run -> pictures")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: sized for the device)")
    s.set_defaults(run=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args, rest) if getattr(args, "takes_overrides", False) else args.run(args)
    except UserError as e:
        if not (isinstance(e, SharedError) and os.environ.get("RANK", "0") != "0"):  # once per run
            print(f"vae-dist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae-dist: interrupted", file=sys.stderr)
        return 130
