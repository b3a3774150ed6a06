"""Faults a user meets around the commands' files (issue 43): outputs that cannot be written,
checkpoint and run files that were edited, damaged or planted. Each ends in one line naming
the file, never a traceback, and nothing in a planted file runs."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vae_dist.checkpoint import STATE, latest_checkpoint

from .conftest import match_checksum, needs_loader, run_cli, tmpfs
from .test_faults import _one_line, _train


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A finished two-step run: its weights, config.yaml and one checkpoint. Tests copy it."""
    run = tmp_path_factory.mktemp("cli-faults") / "run"
    r = _train(shards, run, "--train.max_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def _main(capsys, *argv) -> tuple[int, str, list[str]]:
    """The command in this process: its exit code, stdout and stderr's lines."""
    from vae_dist.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


# issue 43, case 13: any output into a read-only folder is one line, before the work
@needs_loader
def test_outputs_into_a_read_only_folder_are_refused_in_one_line_before_the_work(shards, sample_root, trained,
                                                                                 tmp_path, capsys):
    ro = tmp_path / "ro"
    with tmpfs(ro, "ro,size=1m"):
        weights = trained / "model.safetensors"
        cases = [
            (["encode", weights, "--shards", shards, "--out", ro / "x.npz"],
             f"cannot write encode --out file {ro / 'x.npz'}: Read-only file system"),
            (["encode", weights, "--shards", shards, "--out", ro / "sub" / "x"],
             f"cannot write encode --out file {ro / 'sub' / 'x.npz'}: Read-only file system"),
            (["sample", weights, ro, "--n", "2"], f"cannot write into sample output folder {ro}: Read-only file system"),
            (["viz", weights, ro, "--shards", shards], f"cannot write into viz output folder {ro}: Read-only file system"),
            (["eval", weights, "--shards", shards, "--json", ro / "e.json", "--calib-images", "16"],
             f"cannot write eval --json file {ro / 'e.json'}: Read-only file system"),
            (["pack", sample_root, ro], f"cannot write into pack output folder {ro}: Read-only file system"),
            (["sample-data", ro], f"cannot write into sample-data output folder {ro}: Read-only file system"),
            (["bench", "step", "--tiny", "--json", ro / "s.json"], f"cannot write bench --json file {ro / 's.json'}: "
                                                                  "Read-only file system"),
            (["bench", "step", "--tiny", "--plot", ro / "s.png"], f"cannot write bench --plot file {ro / 's.png'}: "
                                                                  "Read-only file system"),
            (["train", f"--data.shards={shards}", f"--train.out_dir={ro}"],
             f"cannot write into train.out_dir {ro}: Read-only file system"),
            (["train", f"--data.shards={shards}", f"--train.out_dir={ro / 'sub'}"],
             f"cannot make train.out_dir {ro / 'sub'}: Read-only file system"),
        ]
        for argv, words in cases:
            code, out, err = _main(capsys, *argv)
            assert code == 2 and err == [f"vae-dist: error: {words}"], (argv, code, err)
            assert "ELBO" not in out  # eval refused before it scored anything


# issue 43, case 13: eval shows its result before it writes the JSON; a failed write is one line
@needs_loader
def test_eval_shows_its_result_before_a_json_write_that_fails(shards, trained, tmp_path):
    full = tmp_path / "full"
    with tmpfs(full, "size=4k"):  # one page, filled: a folder that takes an empty file but no data
        (full / "filler").write_bytes(bytes(4096))
        r = run_cli("eval", str(trained), "--shards", str(shards), "--json", str(full / "e.json"),
                    "--calib-images", "16", "--batch-size", "32")
        _one_line(r, f"cannot write eval --json file {full / 'e.json'}: No space left on device")
        assert "val: 60 images | ELBO" in r.stdout and "bits/dim" in r.stdout, r.stdout  # the result, shown
        assert "results:" not in r.stdout
    # issue 44, item 10: without --shards, eval scores the run's own shards (as viz draws them)
    r = run_cli("eval", str(trained), "--json", str(tmp_path / "e.json"), "--calib-images", "16", "--batch-size", "32")
    assert r.returncode == 0 and f"results: {tmp_path / 'e.json'}" in r.stdout, r.stderr[-2000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["images"] == 60 and result["shards"] == str(shards), result


class _Planted:
    """What a malicious checkpoint file holds: an object whose unpickling runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# issue 43, case 16: a planted or damaged optimizer.pt / rng_rank0.pt is one line, never torch's advice
@needs_loader
def test_checkpoint_torch_files_that_are_not_plain_tensors_are_refused_in_one_line(shards, trained, tmp_path):
    marker = tmp_path / "planted-code-ran"
    cases = [  # (file, what is written, words of the line)
        ("optimizer.pt", {"state": _Planted(marker), "param_groups": []},
         "cannot be read safely (Trying to load unsupported GLOBAL posix.system"),
        ("rng_rank0.pt", {"cpu": _Planted(marker)}, "cannot be read safely (Trying to load unsupported GLOBAL posix.system"),
        ("rng_rank0.pt", b"\x80\x02garbage" * 8, "cannot be read safely (Unsupported operand"),
        ("rng_rank0.pt", {"cpu": torch.zeros(3)}, "does not load (RNG state must be a torch.ByteTensor)"),
    ]
    for i, (name, content, words) in enumerate(cases):
        run = shutil.copytree(trained, tmp_path / f"run{i}")
        ckpt = latest_checkpoint(run)
        if isinstance(content, bytes):
            (ckpt / name).write_bytes(content)
        else:
            torch.save(content, ckpt / name)
        match_checksum(ckpt, name)
        r = _train(shards, run, "--train.max_steps=4")
        line = _one_line(r, f"checkpoint file {ckpt / name} {words}")
        assert "weights_only" not in r.stderr and "Warning" not in r.stderr, r.stderr
        assert line.endswith("not a vae-dist checkpoint file" if "safely" in words else "not a vae-dist checkpoint")
        assert latest_checkpoint(run) == ckpt  # nothing trained, nothing written
        assert (run / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()
    assert not marker.exists()  # nothing in the planted files ran


# issue 43, case 19: a damaged config.yaml of a run given to viz (or to train --config) is one line naming it
def test_a_damaged_run_config_is_one_line_naming_the_file(trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "model.safetensors", run)
    config = run / "config.yaml"
    marker = tmp_path / "tag-code-ran"
    cases = [
        ("data: [unclosed\n", f"config file {config} is not valid YAML: while parsing a flow sequence; "
                              "pass --shards DIR"),
        (f"!!python/object/apply:os.system ['touch {marker}']\n",
         f"config file {config} is not valid YAML: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object/apply:os.system'; pass --shards DIR"),
        ("- data\n- train\n", f"config file {config} must hold a mapping of sections; pass --shards DIR"),
        ("data: 5\n", f"config section 'data' must be a mapping (in {config}); pass --shards DIR"),
        ("data:\n  shards: [1, 2]\n", f"config file {config}: data.shards must be a folder name, got [1, 2]; "
                                      "pass --shards DIR"),
        (b"\xff\xfe\x00binary", f"config file {config} is not valid YAML: 'utf-8' codec can't decode byte 0xff"),
    ]
    for text, words in cases:
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        code, out, err = _main(capsys, "viz", run, tmp_path / "pics")
        assert code == 2 and len(err) == 1 and err[0].startswith(f"vae-dist: error: {words}"), (text, err)
        code, out, err = _main(capsys, "eval", run)  # issue 44, item 10: eval finds the run's shards as viz does
        assert code == 2 and len(err) == 1 and err[0].startswith(f"vae-dist: error: {words}"), (text, err)
        code, out, err = _main(capsys, "train", "--config", config, "--print-config")
        assert code == 2 and len(err) == 1 and f"{config}" in err[0], (text, err)
    assert not (tmp_path / "pics").exists() and not marker.exists()


_REMOVED = object()  # an edit that deletes the key


# issue 43, case 20: an edited trainer_state.json (checksum matched) is one line naming the file and the key
@needs_loader
@pytest.mark.parametrize("edit, words", [
    ({"step": -4}, "key 'step' must be a whole number 0 or more, got -4"),
    ({"step": "abc"}, "key 'step' must be a whole number 0 or more, got \"abc\""),
    ({"epoch": _REMOVED}, "lacks the key 'epoch'"),
    ({"epoch": -1}, "key 'epoch' must be a whole number 0 or more, got -1"),
    ({"batch_in_epoch": 1.5}, "key 'batch_in_epoch' must be a whole number 0 or more, got 1.5"),
    ({"world_size": 0}, "key 'world_size' must be a whole number 1 or more, got 0"),
    ({"sigma": "x"}, "key 'sigma' must be a number 0 or more, or null, got \"x\""),
    ([], "must hold a JSON object of keys, got []"),
])
def test_an_edited_trainer_state_is_one_line_naming_the_key(shards, trained, tmp_path, edit, words):
    run = shutil.copytree(trained, tmp_path / "run")
    ckpt = latest_checkpoint(run)
    if isinstance(edit, dict):
        state = json.loads((ckpt / STATE).read_text())
        state = {k: v for k, v in {**state, **edit}.items() if v is not _REMOVED}
    else:
        state = edit
    (ckpt / STATE).write_text(json.dumps(state))
    match_checksum(ckpt, STATE)
    r = _train(shards, run, "--train.max_steps=4")
    _one_line(r, f"checkpoint file {ckpt / STATE}", words)
