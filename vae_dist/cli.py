"""The `vae-dist` command: parses arguments, calls the modules, reports errors.

Every failure a user can cause ends in one line on stderr naming the cause, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from vae_dist.errors import SILENT_RANK_WAIT_S, SharedError, Terminated, UserError, report, reported_here


def _sample_data(args) -> int:
    from vae_dist.data.sample import make_sample_dataset

    out = make_sample_dataset(args.out, args.train_per_class, args.val_per_class, args.test, args.seed,
                              make_zip=args.zip, workers=args.workers)
    print(f"sample dataset written to {out}" + (f" (and {out.with_suffix('.zip')})" if args.zip else ""))
    return 0


def _pack(args) -> int:
    from vae_dist.data.pack import PackOptions, pack, summary

    splits = tuple(s for s in args.splits.split(",") if s)
    opts = PackOptions(shard_size=args.shard_size, workers=args.workers, seed=args.seed, splits=splits,
                       image_size=args.image_size, quality=args.quality, keep_source=not args.reencode,
                       layout=args.layout, val_fraction=args.val_fraction)
    from vae_dist.data.remote import is_url

    if is_url(args.out):  # packed under --staging, then uploaded, manifest.json last
        from vae_dist.data.pack import pack_to_url

        manifest = pack_to_url(args.src, args.out, opts, staging=args.staging)
    else:
        manifest = pack(args.src, args.out, opts)
    print(summary(manifest))
    print(f"shards and manifest.json in {args.out}")
    return 0


def _index(args) -> int:
    from vae_dist.data.index import IndexOptions, index_shards, summary

    opts = IndexOptions(image_size=args.image_size, label=args.label, val_shards=args.val_shards,
                        val_fraction=args.val_fraction, seed=args.seed)
    manifest = index_shards(args.shards, args.out, opts, retries=args.retries, jobs=args.jobs)
    print(summary(manifest))
    from vae_dist.data.index_url import source_folder

    where = args.out or source_folder(args.shards)
    print(f"manifest.json and .idx files in {where}: train with --data.shards={where}")
    return 0


def _verify(args) -> int:
    from vae_dist.data.verify import verify
    from vae_dist.errors import DataError, counted

    problems = verify(args.dir)
    for line in problems:
        print(line)
    if problems:
        n = len(problems)
        raise DataError(f"{args.dir}: {counted(n, 'problem')} with the shards (listed above): "
                        f"pack them again from the source images")
    print(f"{args.dir}: all shards match manifest.json")
    return 0


def _train(args, rest: list[str]) -> int:
    from vae_dist.config import build_config, dump_yaml

    cfg = build_config(args.config, rest)
    if args.print_config:  # what this run would use, as a valid --config file, unset keys as --help writes them
        print(dump_yaml(cfg, as_typed=True), end="")
        return 0
    from vae_dist.train import train

    return train(cfg)


def _viz(args) -> int:
    from vae_dist.viz import viz_checkpoint

    paths = viz_checkpoint(args.ckpt, args.out, shards=args.shards, num_images=args.num_images)
    for p in paths:
        print(p)
    return 0


def _eval(args) -> int:
    from vae_dist.inference import evaluate_checkpoint, format_eval, write_eval_json

    result = evaluate_checkpoint(args.ckpt, args.shards, split=args.split, iw=args.iw, json_path=args.json,
                                 calib_images=args.calib_images, batch_size=args.batch_size, seed=args.seed)
    print(format_eval(result), flush=True)  # shown before the JSON is written: a failed write loses nothing
    if args.json and write_eval_json(result, args.json):
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


ABOUT = """\
vae-dist trains the coursework convolutional VAE (4 stride-2 convs 3->64->128->256->512, a
128-d latent, a mirrored transposed-conv decoder) on Tiny ImageNet or your own folder of images,
at 16 to 512 pixels, at the speed of the hardware: WebDataset shards decoded by NVIDIA DALI,
DDP with mixed precision and torch.compile under Accelerate (one GPU to many nodes),
checkpoints that resume to the exact batch, and Weights & Biases logging from rank 0."""

EXAMPLES = """\
examples:
  vae-dist demo                                        sample data -> shards -> training -> pictures
  vae-dist pack tiny-imagenet-200.zip shards/          Tiny ImageNet -> WebDataset shards
  vae-dist pack photos/ shards-128/ --image-size 128    your own images (class folders or not) at 128x128
  vae-dist train --data.shards=shards --train.out_dir=runs/tin   one process (a CPU or one GPU)
  bash launch/train_single_node.sh --data.shards=shards         every GPU of this node (counted), DDP + bf16
  bash launch/train_cpu_dev.sh --data.shards=shards             2 processes on a CPU machine (gloo, fp32)
  accelerate launch --config_file accelerate_config.yaml --num_processes 4 -m vae_dist train --data.shards=shards
                         accelerate_config.yaml is made for 8 GPUs on one node: --num_processes = your GPUs
  vae-dist eval runs/tin --iw 16                       bits/dim and PSNR of the trained model (on its own shards)

`vae-dist COMMAND --help` gives a command's options; `vae-dist train --help` lists every config key."""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (lists, examples) and each option's default after its meaning,
    spelled as it is typed; an option whose default is decided at run time says how in its text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "%(default)" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _ToolHelp(_Help):
    """`vae-dist --help`: argparse measures the command names one indent short of where it
    prints them, so the longest (sample-data) would push its line below; room for it here."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog)
        self._action_max_length = len("    sample-data")


class _TrainHelp(_Help):
    """`train --help` lists every config key, generated from the config dataclasses."""

    def format_help(self) -> str:
        from vae_dist.config import config_help

        return super().format_help() + "\nconfig keys (--section.key=value or --section.key value; " \
            "defaults < --config FILE < command line):\n" + config_help() + "\n"


def _checkpoint_arg(p) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder, a run folder (its final weights) or a "
                   "model.safetensors file")


def _command(sub, name: str, summary: str, *, description: str = "", **kwargs) -> argparse.ArgumentParser:
    """A subcommand: its one line in `vae-dist --help`, and that line (and more) atop its own help."""
    return sub.add_parser(name, help=summary, description=summary + (f"\n\n{description}" if description else ""),
                          formatter_class=kwargs.pop("formatter_class", _Help), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae-dist", description=ABOUT, epilog=EXAMPLES, formatter_class=_ToolHelp)
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    s = _command(sub, "sample-data", "write the offline sample data set (Tiny ImageNet's folder layout)",
                 description="One class per photograph that scikit-image ships, cut into 64x64 crops: "
                             "no download.")
    s.add_argument("out", metavar="OUT", help="folder to write (train/, val/, test/, wnids.txt, words.txt)")
    s.add_argument("--train-per-class", type=int, default=200, help="train images per class")
    s.add_argument("--val-per-class", type=int, default=50, help="val images per class")
    s.add_argument("--test", type=int, default=50, help="unlabelled test images")
    s.add_argument("--seed", type=int, default=0, help="seed of the crops")
    s.add_argument("--zip", action="store_true", help="also write OUT.zip, as Tiny ImageNet is released")
    s.add_argument("--workers", type=int, default=0, help="rendering processes (0: all cores); the same images for any")
    s.set_defaults(run=_sample_data)

    s = _command(sub, "pack", "Tiny ImageNet or a folder of images (or their .zip) -> WebDataset shards + manifest.json",
                 description="Layouts (--layout auto finds which):\n"
                             "  tinyimagenet  wnids.txt, train/<wnid>/images/, val/val_annotations.txt\n"
                             "  classes       SRC/<class>/**/*.jpg (torchvision's ImageFolder; labels in sorted order)\n"
                             "  flat          SRC/**/*.jpg, no classes (auto: images with no folders beside them)\n"
                             "Either of the last two may be split already: SRC/train/..., SRC/val/..., SRC/test/...;\n"
                             "without a val/ folder, --val-fraction of the images is held out as val.\n"
                             "Any image Pillow reads packs; every file that is not packed is listed in manifest.json\n"
                             "with the reason.")
    s.add_argument("src", metavar="SRC", help="a Tiny ImageNet folder, a folder of class folders or of images, "
                   "or a .zip of one")
    s.add_argument("out", metavar="OUT", help="shard folder to write (packing again replaces its shards whole), or an "
                   "s3://bucket/prefix/ URL: packed locally, then uploaded, manifest.json last")
    s.add_argument("--shard-size", type=int, default=5000, help="samples per tar")
    s.add_argument("--workers", type=int, default=0, help="decode processes (0: all cores)")
    s.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    s.add_argument("--splits", default="train,val", help="comma list of train,val,test")
    s.add_argument("--layout", default="auto", choices=["auto", "tinyimagenet", "classes", "flat"],
                   help="how SRC is laid out (see above)")
    s.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="share of the images held out as val when SRC has no val split (default: 0.05)")
    s.add_argument("--image-size", type=int, default=64, help="height and width of the packed images, a multiple "
                   "of 16 from 16 to 512: the shorter side is resized to it around the centre")
    s.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    s.add_argument("--reencode", action="store_true", help="re-encode every image, even RGB JPEGs already at "
                   "--image-size")
    s.add_argument("--staging", metavar="DIR", help="where a pack to a URL is written before the upload "
                   "(default: $TMPDIR; it needs the shards' size free)")
    s.set_defaults(run=_pack)

    s = _command(sub, "index", "WebDataset tars another tool wrote (img2dataset's) -> manifest.json + .idx, "
                 "no repacking",
                 description="Each tar's samples are its members grouped by key; the image is the jpg, jpeg, png or\n"
                             "webp member (a sample without one is skipped and counted). Images may be of any size:\n"
                             "each is resized (shorter side to --image-size) and centre-cropped at decode.\n"
                             "Labels (--label): auto = cls where any sample has a .cls member, else none; cls = the\n"
                             ".cls member's text; json:KEY = that key of the .json member; none = -1 for all.\n"
                             "Integers are the labels; other values are class names, numbered in sorted order.\n"
                             "The .idx and .labels files and manifest.json go beside the tars, or into --out DIR\n"
                             "(a read-only source): that manifest records where the tars are (shard_base).\n"
                             "SHARDS may be a URL: s3://bucket/prefix/ (its .tar objects), an http(s) folder URL\n"
                             "whose server lists it (an autoindex), or either with the tars named in WebDataset's\n"
                             "brace notation, e.g. https://host/set/{00000..00009}.tar. Each tar is downloaded,\n"
                             "scanned and deleted (--jobs at a time). Without --out the index is uploaded beside the\n"
                             "tars (s3:// only: manifest.json last); an http(s) source needs --out.")
    s.add_argument("shards", metavar="SHARDS", help="folder of WebDataset .tar files (e.g. img2dataset's output), "
                   "or their URL (see above)")
    s.add_argument("--out", metavar="DIR", default=None, help="local folder for the index (default: beside the tars)")
    s.add_argument("--image-size", type=int, default=64, help="height and width the images are resized and "
                   "cropped to, a multiple of 16 from 16 to 512")
    s.add_argument("--label", default="auto", metavar="RULE", help="where labels come from: auto, cls, json:KEY "
                   "or none (see above)")
    s.add_argument("--val-shards", type=int, default=None, metavar="N", help="hold out the last N tars whole as val")
    s.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="hold out this share of the samples as val, chosen by --seed (default: 0.05 when "
                        "--val-shards is not given)")
    s.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction draw")
    s.add_argument("--retries", type=int, default=5, metavar="N", help="a URL source: tries per request "
                   "(backoff 0.5 s, doubling) before one line names the URL")
    s.add_argument("--jobs", type=int, default=4, metavar="N", help="a URL source: tars downloaded and scanned "
                   "at a time (each deleted when scanned: N tars on local disk at most)")
    s.set_defaults(run=_index)

    s = _command(sub, "verify", "check every shard against manifest.json (sha256, counts, complete samples)")
    s.add_argument("dir", metavar="DIR", help="shard folder (holds manifest.json)")
    s.set_defaults(run=_verify)

    s = _command(sub, "train", "train (under `accelerate launch` for several processes or nodes)",
                 description="Config overrides follow as --section.key=value (or --section.key value), e.g.\n"
                             "  vae-dist train --data.shards=shards --train.out_dir=runs/tin --train.epochs=20",
                 formatter_class=_TrainHelp)
    s.add_argument("--config", metavar="FILE", help="YAML file of config sections (e.g. a run's config.yaml)")
    s.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    s.set_defaults(run=_train, takes_overrides=True)

    s = _command(sub, "viz", "pictures from a checkpoint: reconstructions, samples, interpolations, latent space")
    _checkpoint_arg(s)
    s.add_argument("out", metavar="OUT", help="folder to write the PNG files into")
    s.add_argument("--shards", metavar="DIR", help="shard folder for real images (default: the run's data.shards)")
    s.add_argument("--num-images", type=int, default=8, help="images per reconstruction grid (twice as many are "
                   "drawn for the interpolation pairs)")
    s.set_defaults(run=_viz)

    s = _command(sub, "eval", "bits/dim (ELBO and importance-weighted bound) and PSNR of a checkpoint")
    _checkpoint_arg(s)
    s.add_argument("--shards", metavar="DIR", help="shard folder (default: the run's data.shards)")
    s.add_argument("--split", default="val", help="split to score: train, val or test, one the shards hold")
    s.add_argument("--iw", type=int, default=1, help="importance samples K per image (K=1: the ELBO alone)")
    s.add_argument("--json", metavar="FILE", help="write the results JSON to this file")
    s.add_argument("--calib-images", type=int, default=10000,
                   help="train images that calibrate the MSE decoder's sigma (never the scored split)")
    s.add_argument("--batch-size", type=int, default=256, help="images per batch")
    s.add_argument("--seed", type=int, default=0, help="seed of the latent samples")
    s.set_defaults(run=_eval)

    s = _command(sub, "sample", "images from the prior of a checkpoint: a grid and single PNGs")
    _checkpoint_arg(s)
    s.add_argument("out", metavar="OUT", help="folder to write samples.png and sample_NNNN.png into")
    s.add_argument("--n", type=int, default=64, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="seed of the prior noise (the same seed, the same images)")
    s.set_defaults(run=_sample)

    s = _command(sub, "encode", "posterior means, log-variances and labels of a split as .npz")
    _checkpoint_arg(s)
    s.add_argument("--shards", metavar="DIR", help="shard folder (default: the run's data.shards)")
    s.add_argument("--split", default="val", help="split to encode: train, val or test, one the shards hold")
    s.add_argument("--out", required=True, metavar="FILE", help="the .npz file to write (required)")
    s.set_defaults(run=_encode)

    s = _command(sub, "bench", "throughput benchmarks (images/s) of the loaders, the step, or training end to end",
                 description="Each prints a table; `vae-dist bench KIND --help` gives that benchmark's options.")
    from vae_dist.bench import add_bench_args

    add_bench_args(s)
    s.set_defaults(run=_bench)

    s = _command(sub, "demo", "sample data -> shards -> a short training run -> pictures, all offline")
    s.add_argument("--out", default="runs/demo", metavar="DIR", help="folder for the data, the shards and the run")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: 600 on a CPU, 3000 on a GPU)")
    s.set_defaults(run=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    from vae_dist.bench import kind_first

    argv = kind_first(argv)  # `bench --tiny step` reads as `bench step --tiny`
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args, rest) if getattr(args, "takes_overrides", False) else args.run(args)
    except UserError as e:
        report(e)  # once per run where every rank raised it alike (rank 0 may have printed it already)
        if isinstance(e, SharedError) and not reported_here(e):
            time.sleep(SILENT_RANK_WAIT_S)  # rank 0 exits first: see SILENT_RANK_WAIT_S
        return 2
    except KeyboardInterrupt:
        print("vae-dist: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"vae-dist: {e}", file=sys.stderr)
        return 128 + 15  # SIGTERM's number
