"""One typed config tree: defaults < YAML file < `--section.key=value` overrides.

Every key is a field of a dataclass below; an unknown key or a value of the wrong type is
a `ConfigError` that names the key. The resolved tree is dumped to `config.yaml` in every
run folder and checkpoint, and loaded back from there.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vae_dist.errors import ConfigError, counted, first_line
from vae_dist.model import VAEConfig

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class DataConfig:
    shards: str = "shards"  # folder holding manifest.json and the shards, or an https:// or s3:// URL of one
    loader: Literal["auto", "dali", "webdataset"] = "auto"  # the data loader; auto: DALI when importable, else webdataset
    decode: Literal["auto", "gpu", "cpu"] = "auto"  # DALI decode device; auto: gpu when CUDA
    num_threads: int | None = None  # DALI CPU threads / PyTorch loader workers per process; auto: cores / local processes
    prefetch: int = 2  # DALI prefetch queue depth
    shuffle_buffer: int = 4096  # webdataset loader's shuffle buffer, shuffle=global (DALI and the cache permute the whole split)
    shuffle: Literal["auto", "global", "shards"] = "auto"  # train order: global or shards (blocks per rank); auto: global locally
    shuffle_block: int = 16  # shuffle=shards: shards shuffled together (class-sorted: batch-mix TV 0.99 at 1, 0.87 at 16)
    hw_decoder_load: float = 0.65  # DALI mixed decode: share of images sent to the GPU's hardware JPEG decoder
    fancy_upsampling: bool = True  # DALI: upsample JPEG chroma as libjpeg-turbo does, so GPU and CPU pixels agree
    flip: bool = True  # random horizontal flip on train
    cache: Literal["auto", "none", "ram", "gpu"] = "auto"  # decode train+val once (uint8); auto: into the GPU if they fit
    cache_budget: float = 0.5  # data.cache=auto caches when the decoded splits fit in this share of free memory
    shard_cache: str | None = None  # where shards read from a URL are kept; auto: ~/.cache/vae-dist/shards/<URL's hash>/
    shard_cache_gb: float = 50.0  # the shard cache's bound on disk; a URL's set larger than it streams in shard order
    shard_prefetch: int = 4  # shards fetched ahead of use from a URL, on background threads
    fetch_retries: int = 5  # tries per request to a URL (backoff 0.5 s doubling), then one line naming it
    verify: bool = False  # before training: `vae-dist verify` (every sha256; ~10 s for Tiny ImageNet); sizes are always checked


@dataclass
class ModelConfig(VAEConfig):
    image_size: int | None = None  # input height and width; auto: the shards' image_size (manifest.json)
    compile: bool | None = None  # torch.compile the training step; auto: on when training on CUDA
    compile_mode: CompileMode = "default"  # reduce-overhead, max-autotune (CUDA graphs): refused with several processes
    channels_last: bool | None = None  # channels_last memory format; auto: on when training on CUDA


@dataclass
class LossConfig:
    recon: Literal["sum", "mean", "gaussian"] = "sum"  # sum: MSE summed over pixels (the seed's); gaussian: σ-VAE
    kl_schedule: Literal["constant", "linear", "sigmoid", "cyclical"] = "linear"  # KL annealing: beta over the run
    beta: float = 1.0  # final / maximum KL weight
    kl_warmup: float = 0.25  # linear/sigmoid: fraction of all steps until beta is reached
    kl_cycles: int = 4  # cyclical: number of cycles over training (Fu et al. 2019)
    kl_ratio: float = 0.5  # cyclical: fraction of each cycle spent increasing beta
    free_bits: float = 0.0  # nats per latent dim below which KL is not penalised


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam's learning rate (the seed's); scale it with the global batch (README)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decay rates
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.0  # L2 weight decay (Adam's, not decoupled)
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (the norm is logged anyway)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # lr after the warm-up
    warmup_steps: int = 0  # linear lr warm-up from 0 over this many steps
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    sigma_lr_scale: float = 10.0  # loss.recon=gaussian: lr of the learned sigma, as a multiple of lr


@dataclass
class TrainConfig:
    out_dir: str = "runs/vae"  # the run folder: config, metrics, checkpoints, pictures, W&B
    batch_size: int = 64  # per process (the seed's 64)
    global_batch_size: int | None = None  # per optimizer step, all processes: wins over batch_size; divides by processes x accum
    epochs: int = 20  # passes over the train split (the seed's 20)
    max_steps: int | None = None  # optimizer steps in all: wins over epochs when set
    eval_every: int = 1000  # steps between evaluations; 0: none by steps. The last step is always evaluated
    eval_at_epoch_end: bool = True  # also evaluate at every epoch end; false: only eval_every and the last step
    eval_images: int | None = None  # score only the first N val images (the same ones for any process count); none: all
    checkpoint_every: int = 1000  # steps; 0 = only at the end (and on SIGTERM)
    keep_last: int = 3  # checkpoints kept (the newest)
    resume: str = "auto"  # auto: newest checkpoint that verifies | none | path to a checkpoint folder
    overwrite: bool = False  # start over in a folder that holds another run: it is moved to OUT_DIR.old-TIME
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # autocast; auto: bf16 on CUDA. accelerate launch wins
    seed: int = 0  # global seed: weights, data order, flips, noise
    max_bad_steps: int = 20  # consecutive non-finite steps before giving up (checked every log.log_every)
    # above the longest legitimate wait of one rank for the others (a checkpoint, an evaluation)
    collective_timeout_s: float = 300.0  # seconds no rank progresses before the run stops, naming the stalled one; 0: off
    resume_other_data: bool = False  # resume a checkpoint on shards other than those it was trained on
    profile_steps: tuple[int, int] | None = None  # START,STOP: a torch.profiler trace of those steps in OUT_DIR/profile
    cuda_graph: bool = False  # the whole step as one CUDA graph (one process, CUDA, bf16/fp32, no accumulation)
    # -- scale-out (docs/scaling.md): how gradients cross the processes --------------------
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step; one all-reduce (DDP no_sync on the others)
    ddp_comm_hook: Literal["none", "bf16", "fp16", "powersgd"] = "none"  # bf16/fp16: half the bytes; powersgd: NCCL only
    ddp_bucket_mb: int = 25  # DDP's bucket_cap_mb: a bucket is all-reduced once the backward pass has filled it
    ddp_bucket_view: bool = False  # DDP's gradient_as_bucket_view: gradients live in the buckets (one copy less)
    ddp_static_graph: bool = False  # DDP's static_graph: the same parameters get gradients every step (true for this VAE)
    powersgd_rank: int = 1  # ddp_comm_hook=powersgd: rank of the gradient approximation (matrix_approximation_rank)
    powersgd_start: int = 1000  # ddp_comm_hook=powersgd: optimizer steps of plain all-reduce first (start_powerSGD_iter)


@dataclass
class LogConfig:
    log_every: int = 50  # steps between scalar rows (metrics.jsonl, W&B)
    peak_tflops: float | None = None  # one device's dense peak TFLOP/s for mfu; auto: from the GPU's name (H100/H200/A100)
    image_every: int = 1000  # steps between picture sets; they are also made at the end
    num_images: int = 8  # images in reconstruction / interpolation grids
    wandb_mode: Literal["online", "offline", "disabled"] | None = None  # W&B; auto: online with WANDB_API_KEY set, else offline
    wandb_resume: Literal["allow", "rewind"] = "allow"  # rewind: an online resume cuts the W&B run back to its checkpoint
    project: str = "vae-dist"  # W&B project
    entity: str | None = None  # W&B entity (user or team); none: your default
    name: str | None = None  # W&B run name; none: the run folder's name
    group: str | None = None  # W&B group; none: no group
    tags: tuple[str, ...] = ()  # W&B tags, comma-separated ([]: none)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------------------
# reading values


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false (any case) are booleans. PyYAML reads
    YAML 1.1, where `no`, `off`, `yes`, `on` are booleans too, so `train.precision: no` (a
    choice word) would arrive as False; here every word stays the word the user wrote, and a
    true/false key takes the yes/no/on/off words itself (`_coerce`)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def load_yaml_text(text: str) -> Any:
    """A YAML document as the config reads it (every source: files, the command line, run folders)."""
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------------------------------
# typed coercion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp` and converts what is safe to convert."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
            # a W&B sweep agent passes str() of values its YAML 1.1 reader made booleans
            # (`values: [no, bf16]` arrives as --train.precision=False)
            value = "no" if value is False else "yes"
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):  # "a,b" from the command line: each item a YAML scalar
            value = [_parse_cli_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"config key '{key}' must be true or false (or yes/no, on/off), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_cli_value(text: str) -> Any:
    """Command-line values are YAML scalars: 1e-3, true, null, [1, 2], plain strings; and the
    Python spellings a W&B sweep agent writes (True, None)."""
    if text == "None":
        return None
    try:
        return load_yaml_text(text)
    except yaml.YAMLError:
        return text


def _words_to_none(value: Any, tp: Any) -> Any:
    # `auto` / `none` mean "decide at run time" for the Optional fields, unless the word is
    # itself one of the field's choices (data.cache=none).
    if value not in ("auto", "none") or typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return value
    args = typing.get_args(tp)
    choices = [c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    return None if type(None) in args and value not in choices else value


# keys that were renamed: what replaces them, for the error a stale config file gets
RENAMED = {"train.eval_batches": "train.eval_images (a cap on val images, the same ones for any process count)"}


def apply(cfg: Config, updates: dict[str, Any], source: str = "") -> Config:
    """Sets dotted keys ('train.batch_size') on cfg in place, type-checked."""
    for dotted, value in updates.items():
        section_name, _, key = dotted.partition(".")
        sections = _field_types(Config)
        fields = _field_types(type(getattr(cfg, section_name))) if section_name in sections else {}
        if key not in fields:
            hint = f": it is now {RENAMED[dotted]}" if dotted in RENAMED else ""
            raise ConfigError(f"unknown config key '{dotted}'{source}{hint}")
        section = getattr(cfg, section_name)
        tp = fields[key]
        try:
            setattr(section, key, _coerce(_words_to_none(value, tp), tp, dotted))
        except ConfigError as e:  # a value of the wrong type: where it was written, too
            raise ConfigError(f"{_or_unset(str(e), tp, type(section), key)}{source}") from None
    return cfg


def _or_unset(message: str, tp: Any, cls: type, key: str) -> str:
    """The refusal of a value for an optional key lists its unset word (`auto` or `none`, as
    --help writes it) among the values it accepts: `must be true or false ..., or auto, got ...`."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType) or type(None) not in typing.get_args(tp):
        return message
    must, sep, got = message.rpartition(", got ")
    return f"{must}, or {_unset_word(field_help(cls).get(key, ''))}{sep}{got}" if sep else message


def _flatten(tree: dict, source: str) -> dict[str, Any]:
    flat = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping{source}")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = load_yaml_text(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # UnicodeDecodeError: a binary file
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return _flatten(tree, f" (in {path})")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.key=value` and `--section.key value` into {'section.key': value}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}' (config overrides are --section.key=value)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"config key '{arg[2:]}' has no value")
        out[key] = _parse_cli_value(text)
        i += 1
    return out


def build_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if config_file:
        apply(cfg, load_yaml(config_file), source=f" (in {config_file})")
    apply(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Values a run cannot use, refused before anything starts (the key is named)."""
    t, d, log, loss, optim = cfg.train, cfg.data, cfg.log, cfg.loss, cfg.optim
    rules = [
        # (key, value, ok, what it must be); None passes for the optional keys
        ("train.batch_size", t.batch_size, t.batch_size > 0, "positive"),
        ("train.global_batch_size", t.global_batch_size, t.global_batch_size is None or t.global_batch_size > 0,
         "positive"),
        ("train.epochs", t.epochs, t.epochs > 0, "positive"),
        ("train.max_steps", t.max_steps, t.max_steps is None or t.max_steps > 0, "positive"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, "0 or more"),
        ("train.eval_images", t.eval_images, t.eval_images is None or t.eval_images > 0, "positive"),
        ("train.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 0, "0 or more"),
        ("train.keep_last", t.keep_last, t.keep_last > 0, "positive"),
        ("train.max_bad_steps", t.max_bad_steps, t.max_bad_steps > 0, "positive"),
        ("train.collective_timeout_s", t.collective_timeout_s, t.collective_timeout_s >= 0,
         "0 (torch's own 30 minutes) or more"),
        ("train.grad_accum_steps", t.grad_accum_steps, t.grad_accum_steps > 0, "positive"),
        ("train.ddp_bucket_mb", t.ddp_bucket_mb, t.ddp_bucket_mb > 0, "positive"),
        ("train.powersgd_rank", t.powersgd_rank, t.powersgd_rank > 0, "positive"),
        ("train.powersgd_start", t.powersgd_start, t.powersgd_start >= 2, "2 or more (PowerSGD's start_powerSGD_iter)"),
        ("model.latent_dim", cfg.model.latent_dim, cfg.model.latent_dim > 0, "positive"),
        ("model.widths", list(cfg.model.widths), len(cfg.model.widths) > 0 and min(cfg.model.widths) > 0,
         "a non-empty list of positive channel counts"),
        ("log.log_every", log.log_every, log.log_every > 0, "positive"),
        ("log.peak_tflops", log.peak_tflops, log.peak_tflops is None or log.peak_tflops > 0, "positive"),
        ("train.profile_steps", t.profile_steps,
         t.profile_steps is None or 0 <= t.profile_steps[0] < t.profile_steps[1], "START,STOP with 0 <= START < STOP"),
        ("log.image_every", log.image_every, log.image_every > 0, "positive"),
        ("log.num_images", log.num_images, log.num_images > 0, "positive"),
        ("data.num_threads", d.num_threads, d.num_threads is None or d.num_threads > 0, "positive"),
        ("data.cache_budget", d.cache_budget, 0 <= d.cache_budget <= 1, "in [0, 1]"),
        ("data.hw_decoder_load", d.hw_decoder_load, 0 <= d.hw_decoder_load <= 1, "in [0, 1]"),
        ("data.prefetch", d.prefetch, d.prefetch > 0, "positive"),
        ("data.shuffle_buffer", d.shuffle_buffer, d.shuffle_buffer > 0, "positive"),
        ("data.shuffle_block", d.shuffle_block, d.shuffle_block > 0, "positive"),
        ("data.shard_cache_gb", d.shard_cache_gb, d.shard_cache_gb > 0, "positive"),
        ("data.shard_prefetch", d.shard_prefetch, d.shard_prefetch > 0, "positive"),
        ("data.fetch_retries", d.fetch_retries, d.fetch_retries > 0, "positive"),
        ("optim.lr", optim.lr, optim.lr > 0, "positive"),
        ("optim.eps", optim.eps, optim.eps > 0, "positive"),
        ("optim.weight_decay", optim.weight_decay, optim.weight_decay >= 0, "0 or more"),
        ("optim.grad_clip", optim.grad_clip, optim.grad_clip >= 0, "0 or more"),
        ("optim.warmup_steps", optim.warmup_steps, optim.warmup_steps >= 0, "0 or more"),
        ("optim.betas", list(optim.betas), all(0 <= b < 1 for b in optim.betas), "two numbers in [0, 1)"),
        ("optim.min_lr_ratio", optim.min_lr_ratio, 0 <= optim.min_lr_ratio <= 1, "in [0, 1]"),
        ("optim.sigma_lr_scale", optim.sigma_lr_scale, optim.sigma_lr_scale > 0, "positive"),
        ("loss.beta", loss.beta, loss.beta >= 0, "0 or more"),
        ("loss.free_bits", loss.free_bits, loss.free_bits >= 0, "0 or more"),
        ("loss.kl_warmup", loss.kl_warmup, 0 <= loss.kl_warmup <= 1, "in [0, 1]"),
        ("loss.kl_cycles", loss.kl_cycles, loss.kl_cycles > 0, "positive"),
        ("loss.kl_ratio", loss.kl_ratio, 0 < loss.kl_ratio <= 1, "in (0, 1]"),
    ]
    for key, value, ok, must in rules:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {must}, got {value}")
    if cfg.model.learned_sigma and loss.recon != "gaussian":
        raise ConfigError("config key 'model.learned_sigma' needs loss.recon=gaussian (the sigma is learned by that loss)")
    cfg.model.learned_sigma = loss.recon == "gaussian"  # the σ-VAE's decoder carries its sigma
    if cfg.model.image_size is not None and cfg.model.image_size % (2 ** len(cfg.model.widths)):
        raise ConfigError(
            f"config key 'model.image_size' ({cfg.model.image_size}) must divide by "
            f"2**len(model.widths) = {2 ** len(cfg.model.widths)}"
        )


def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line meaning: the comment written beside it in the source (as tyro
    reads them), so it is written once, where the field is."""
    import inspect
    import io
    import tokenize

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # ModelConfig's fields come from VAEConfig too
        if not dataclasses.is_dataclass(klass):
            continue
        lines = inspect.getsource(klass)
        name = None
        for tok in tokenize.generate_tokens(io.StringIO(lines).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
                name = tok.string  # a field line starts at the class body's indent
            elif tok.type == tokenize.COMMENT and name is not None:
                out[name] = tok.string.lstrip("# ").strip()
            elif tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = None
    return out


def _unset_word(meaning: str) -> str:
    """How the command line spells an unset optional key: `auto` where the run decides (its
    meaning says `auto: ...`), else `none`. Both words read as unset (`_words_to_none`)."""
    return "auto" if "auto:" in meaning else "none"


def _type_name(tp: Any, unset: str = "none") -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in args if a is not type(None)) + "|" + unset
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin is tuple:
        return "list of " + _type_name(args[0]) if len(args) == 2 and args[1] is Ellipsis else \
            ",".join(_type_name(a) for a in args)
    return {bool: "true|false"}.get(tp, getattr(tp, "__name__", str(tp)))


def typed_value(value: Any, unset: str = "none") -> str:
    """A config value as it is typed on the command line (`--key=VALUE`)."""
    if value is None:
        return unset
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(typed_value(v) for v in value) if value else "[]"
    return repr(value) if isinstance(value, float) else str(value)


def config_help() -> str:
    """Every config key as `--section.key  TYPE  DEFAULT  meaning`, by section; the default as
    it is typed on the command line."""
    defaults = to_dict(Config())
    lines = []
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        helps = field_help(cls)
        lines.append(f"{section.name}:")
        for name, tp in _field_types(cls).items():
            meaning = helps.get(name, "")
            unset = _unset_word(meaning)
            columns = (f"--{section.name}.{name}", _type_name(tp, unset), typed_value(defaults[section.name][name], unset))
            lines.append("  " + "  ".join(f"{c:<{w}}" for c, w in zip(columns, (26, 24, 10))) + "  " + meaning)
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(v):
        return list(plain(x) for x in v) if isinstance(v, tuple) else v

    return {
        section.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, section.name)).items()}
        for section in dataclasses.fields(cfg)
    }


def dump_yaml(cfg: Config, as_typed: bool = False) -> str:
    """The config as YAML (a run's config.yaml). as_typed: an unset key as --help writes it (`auto`
    where the run decides, else `none`; both read back as unset), what --print-config shows."""
    tree = to_dict(cfg)
    if as_typed:
        for section in dataclasses.fields(Config):
            helps = field_help(type(getattr(cfg, section.name)))
            values = tree[section.name]
            for key, value in values.items():
                if value is None:
                    values[key] = _unset_word(helps.get(key, ""))
    return yaml.safe_dump(tree, sort_keys=False)


def from_dict(tree: dict[str, Any]) -> Config:
    return apply(Config(), _flatten(tree, ""))


def vae_config(model: ModelConfig) -> VAEConfig:
    """The architecture part of the model section (what a weights file needs); model.image_size
    is known once the shards are (data.loaders.fit_model_to_shards)."""
    assert model.image_size is not None, "model.image_size follows the shards: fit_model_to_shards first"
    names = {f.name for f in dataclasses.fields(VAEConfig)}
    return VAEConfig(**{k: v for k, v in dataclasses.asdict(model).items() if k in names})


def per_process_batch(train: TrainConfig, world: int) -> int:
    """Each process's micro-batch, what one forward pass sees: train.global_batch_size split over
    the processes and the accumulation steps when set, else train.batch_size (already per process).
    One optimizer step takes train.grad_accum_steps of them on every process."""
    if train.global_batch_size is None:
        return train.batch_size
    parts = world * train.grad_accum_steps
    if train.global_batch_size % parts:
        split = counted(world, "process", "processes") + (
            f" x {train.grad_accum_steps} accumulation steps" if train.grad_accum_steps > 1 else "")
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} does not divide by {split}: "
                          f"make it a multiple of {parts}, or set train.batch_size (per process) instead")
    return train.global_batch_size // parts


def batch_setting(train: TrainConfig, world: int) -> str:
    """Where each process's batch per optimizer step comes from, as the user set it, for a message
    that asks to change it: the key first (`train.global_batch_size=256 over 8 processes`)."""
    if train.global_batch_size is not None:
        return f"train.global_batch_size={train.global_batch_size} over {counted(world, 'process', 'processes')}"
    accum = f" x train.grad_accum_steps={train.grad_accum_steps}" if train.grad_accum_steps > 1 else ""
    return f"train.batch_size={train.batch_size}{accum}"
