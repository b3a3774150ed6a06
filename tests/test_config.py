"""The typed config tree and its errors."""

import pytest

from vae_dist.config import Config, build_config, dump_yaml, from_dict, parse_overrides
from vae_dist.errors import ConfigError

from .conftest import needs_wandb, run_cli


def test_defaults_follow_the_seed():
    cfg = Config()
    assert cfg.optim.lr == 1e-3 and cfg.train.batch_size == 64 and cfg.train.epochs == 20
    assert cfg.model.latent_dim == 128 and cfg.model.widths == (64, 128, 256, 512)
    assert cfg.loss.kl_schedule != "constant"  # KL annealing on by default


def test_overrides_both_spellings_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 3e-4\ntrain:\n  batch_size: 32\n")
    cfg = build_config(str(f), ["--train.batch_size=16", "--model.widths", "[8,16]", "--model.compile=true",
                                "--model.channels_last=auto", "--log.tags=a,b", "--train.max_steps", "10"])
    assert cfg.optim.lr == 3e-4  # from the file
    assert cfg.train.batch_size == 16  # command line beats the file
    assert cfg.model.widths == (8, 16) and cfg.model.compile is True and cfg.model.channels_last is None
    assert cfg.log.tags == ("a", "b") and cfg.train.max_steps == 10


def test_yaml_round_trip():
    cfg = build_config(None, ["--train.global_batch_size=128", "--loss.kl_schedule=cyclical"])
    import yaml

    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("args, key", [
    (["--train.batchsize=3"], "train.batchsize"),
    (["--nosuch.key=1"], "nosuch.key"),
    (["--train.batch_size=abc"], "train.batch_size"),
    (["--optim.lr=fast"], "optim.lr"),
    (["--model.compile=maybe"], "model.compile"),
    (["--loss.kl_schedule=exp"], "loss.kl_schedule"),
    (["--train.batch_size=0"], "train.batch_size"),
])
def test_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(None, args)


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"train\.nope.*bad\.yaml"):
        build_config(str(bad), [])
    with pytest.raises(ConfigError, match="not found"):
        build_config(str(tmp_path / "missing.yaml"), [])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--train.epochs"])


def test_cli_reports_a_bad_key_in_one_line():
    r = run_cli("train", "--train.bad_key=1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "train.bad_key" in r.stderr and "Traceback" not in r.stderr


def test_train_help_names_every_key_with_its_default_as_typed():
    """Every key's line: type, default, meaning; the default shown is what a user types, so
    passing it on the command line gives the default back; nothing prints as null or None."""
    import dataclasses
    import re

    from vae_dist.config import Config, apply, parse_overrides, to_dict

    r = run_cli("train", "--help")
    assert r.returncode == 0, r.stderr
    assert not re.search(r"\b(null|None)\b", r.stdout), r.stdout
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip().startswith("--")}
    defaults = to_dict(Config())
    for section in dataclasses.fields(Config):
        for key, default in defaults[section.name].items():
            line = lines.get(f"--{section.name}.{key}")
            assert line is not None, f"--{section.name}.{key} missing from train --help"
            _, _, shown, meaning = re.split(r"\s{2,}", line.strip(), maxsplit=3)
            typed = to_dict(apply(Config(), parse_overrides([f"--{section.name}.{key}={shown}"])))
            assert typed[section.name][key] == default, (line, default)
            assert len(meaning.strip()) > 5, f"no meaning given for {section.name}.{key}"
    assert "{auto,dali,webdataset}" in lines["--data.loader"]  # choices are listed
    assert "refused with several processes" in lines["--model.compile_mode"]


def test_print_config_round_trips(tmp_path):
    import re

    import yaml

    args = ["--optim.lr=3e-4", "--model.widths=8,16", "--loss.recon=gaussian", "--log.tags=a,b",
            "--train.max_steps", "7"]
    r = run_cli("train", "--print-config", *args)
    assert r.returncode == 0, r.stderr
    printed = tmp_path / "c.yaml"
    printed.write_text(r.stdout)
    assert build_config(str(printed), []) == build_config(None, args)
    assert yaml.safe_load(r.stdout)["model"]["learned_sigma"] is True  # derived keys show too
    # issue 44, item 10: an unset key prints as --help shows its default (auto or none), never null,
    # and the printed file loads back to the same config
    assert not re.search(r"\b(null|None)\b", r.stdout), r.stdout
    help_text = run_cli("train", "--help").stdout
    for section, key in [("model", "compile"), ("log", "wandb_mode"), ("train", "global_batch_size")]:
        shown = re.split(r"\s{2,}", next(line for line in help_text.splitlines()
                                          if line.strip().startswith(f"--{section}.{key} ")).strip())[2]
        assert yaml.safe_load(r.stdout)[section][key] == shown, (section, key, shown)
    r = run_cli("train", "--print-config", "--train.bad=1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "train.bad" in r.stderr


@needs_wandb
def test_a_sweep_agents_command_line_parses(monkeypatch):
    """launch/sweep.yaml through W&B's own agent code: the command it would run parses."""
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    from vae_dist.cli import build_parser
    from vae_dist.run_folder import expand_out_dir

    from .conftest import ROOT

    sweep = yaml.safe_load((ROOT / "launch" / "sweep.yaml").read_text())
    for pick in (0, -1):  # the first and the last value of every parameter
        params = {k: {"value": v["values"][pick] if "values" in v else v["min" if pick == 0 else "max"]}
                  for k, v in sweep["parameters"].items()}
        argv_args = create_sweep_command_args({"args": params})["args"]
        command = []
        for c in create_sweep_command(list(sweep["command"])):
            command += argv_args if c == "${args}" else ["python"] if c == "${interpreter}" else \
                [] if c == "${env}" else [c]
        assert command[:3] == ["python", "-m", "vae_dist"]
        args, rest = build_parser().parse_known_args(command[3:])
        cfg = build_config(args.config, rest)
        for key, spec in params.items():
            section, name = key.split(".")
            got = getattr(getattr(cfg, section), name)
            assert (list(got) if isinstance(got, tuple) else got) == spec["value"], (key, got)
        monkeypatch.setenv("WANDB_RUN_ID", "abc123")
        assert expand_out_dir(cfg.train.out_dir) == "runs/sweep/abc123"


def _keys_of_type(pick):
    """(dotted key, annotation) of every config field whose annotation `pick` accepts."""
    import dataclasses

    from vae_dist.config import _field_types

    for section in dataclasses.fields(Config):
        for name, tp in _field_types(type(getattr(Config(), section.name))).items():
            if pick(tp):
                yield f"{section.name}.{name}", tp


def _choices(tp) -> tuple:
    import typing

    literals = [a for a in (typing.get_args(tp) if typing.get_origin(tp) is not typing.Literal else [tp])
                if typing.get_origin(a) is typing.Literal]
    return tuple(c for a in literals for c in typing.get_args(a))


def _from_every_source(tmp_path, key: str, word: str) -> dict[str, object]:
    """The value `key` gets when `word` is written on the command line (both spellings), in a
    --config file, and by a W&B sweep agent (whose YAML 1.1 reader loads sweep.yaml's values;
    its own code formats the argument)."""
    import yaml

    section, name = key.split(".")
    got = {}
    for source, args, text in [
        ("--k=v", [f"--{key}={word}"], None),
        ("--k v", [f"--{key}", word], None),
        ("file", [], f"{section}:\n  {name}: {word}\n"),
    ]:
        cfg_file = None
        if text is not None:
            cfg_file = tmp_path / "c.yaml"
            cfg_file.write_text(text)
        cfg = build_config(str(cfg_file) if cfg_file else None, args)
        got[source] = getattr(getattr(cfg, section), name)
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:
        return got
    argv = create_sweep_command_args({"args": {key: {"value": yaml.safe_load(word)}}})["args"]
    got["sweep agent"] = getattr(getattr(build_config(None, argv), section), name)
    return got


def test_every_choice_word_means_itself_from_every_source(tmp_path):
    """Every documented word of every choice-valued key, from every source: YAML 1.1 reads a
    bare `no` (train.precision's fp32) as false, which once refused the word itself."""
    keys = list(_keys_of_type(lambda tp: bool(_choices(tp))))
    assert len(keys) >= 9  # data.loader, data.decode, data.cache, train.precision, log.wandb_mode, ...
    for key, tp in keys:
        for word in _choices(tp):
            got = _from_every_source(tmp_path, key, word)
            assert set(got.values()) == {word}, (key, word, got)
    for word in ("off", "on", "yes", "y", "n"):  # not choices: named in the error, as written
        with pytest.raises(ConfigError, match=rf"'train.precision' must be one of .*got '{word}'"):
            build_config(None, [f"--train.precision={word}"])


def test_true_false_keys_take_yes_no_on_off_from_every_source(tmp_path):
    keys = [k for k, tp in _keys_of_type(lambda tp: tp is bool or tp == (bool | None))
            if k != "model.learned_sigma"]  # set by loss.recon, true only with gaussian
    assert "train.overwrite" in keys and "model.compile" in keys
    for key in keys:
        for word, want in (("yes", True), ("no", False), ("on", True), ("off", False), ("True", True),
                           ("false", False)):
            got = _from_every_source(tmp_path, key, word)
            assert set(got.values()) == {want}, (key, word, got)
    with pytest.raises(ConfigError, match="'train.overwrite' must be true or false"):
        build_config(None, ["--train.overwrite=maybe"])


def test_a_word_for_a_text_key_stays_text():
    cfg = build_config(None, ["--log.name=no", "--log.tags=yes,off", "--log.group", "on"])
    assert (cfg.log.name, cfg.log.tags, cfg.log.group) == ("no", ("yes", "off"), "on")
    r = run_cli("train", "--print-config", "--train.precision=false")
    assert r.returncode == 0 and "precision: 'no'" in r.stdout  # false is fp32 too

def test_the_throughput_preset_loads_and_follows_its_rule():
    """launch/configs/throughput.yaml: batch 512 at the square-root lr rule, a tenth of Tiny
    ImageNet's steps of warm-up, 4x the seed's epochs (docs/scaling.md, the lr study)."""
    from pathlib import Path

    from vae_dist.config import build_config

    cfg = build_config(str(Path(__file__).resolve().parents[1] / "launch" / "configs" / "throughput.yaml"))
    t, o = cfg.train, cfg.optim
    assert t.batch_size == 512 and t.epochs == 4 * 20
    assert o.lr == pytest.approx(1e-3 * (512 / 64) ** 0.5, rel=0.02)
    assert o.warmup_steps == pytest.approx(0.1 * (100_000 // 512) * t.epochs, rel=0.01)


@pytest.mark.parametrize("arg, accepted", [
    ("--model.compile=maybe", "must be true or false (or yes/no, on/off), or auto, got 'maybe'"),
    ("--log.wandb_mode=loud", "must be one of ['online', 'offline', 'disabled'], or auto, got 'loud'"),
    ("--train.max_steps=many", "must be an integer, or none, got 'many'"),
])
def test_a_refused_value_lists_every_accepted_one(arg, accepted):
    """issue 44, item 10: an optional key's unset word (auto or none, as --help writes it) is among
    the values its error lists."""
    r = run_cli("train", arg)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert accepted in r.stderr, r.stderr


def test_a_config_error_under_a_launch_is_printed_by_each_nodes_first_process():
    """issue 44, item 4: every process of a launch reads the same command line and (on its node) the
    same files, so a bad key is one line per node, not one per rank; each process still exits 2."""
    for rank, local_rank, printed in [("0", "0", True), ("1", "1", False), ("8", "0", True)]:
        r = run_cli("train", "--train.bad_key=1", env={"RANK": rank, "LOCAL_RANK": local_rank})
        assert r.returncode == 2, r.stderr
        assert ("train.bad_key" in r.stderr) == printed and r.stderr.count("\n") == int(printed), (rank, r.stderr)
