"""The typed config tree and its errors."""

import pytest

from vae_dist.config import Config, build_config, dump_yaml, from_dict, parse_overrides
from vae_dist.errors import ConfigError

from .conftest import run_cli


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
