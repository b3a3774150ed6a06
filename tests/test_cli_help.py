"""`--help` as a new user reads it: the tool says what it is and lists its commands; every
option of every command has a meaning and shows its default as it is typed."""

import re

import pytest

from vae_dist.cli import build_parser

from .conftest import run_cli

SUBCOMMANDS = next(a for a in build_parser()._actions if a.dest == "command").choices  # name -> its parser
COMMANDS = sorted(SUBCOMMANDS)


def _entries(help_text: str) -> dict[str, str]:
    """Each argument's meaning (the text beside its invocation and the indented lines under it),
    by the first word of the invocation, from argparse's "positional arguments:" and "options:"."""
    entries, current, in_arguments = {}, None, False
    for line in help_text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            in_arguments = line in ("positional arguments:", "options:", "optional arguments:")
            current = None
        elif in_arguments and re.match(r"^  \S", line):
            invocation, _, beside = line.strip().partition("  ")  # two spaces end the invocation
            current = invocation.split()[0].rstrip(",")
            entries[current] = beside.strip()
        elif in_arguments and current and line.startswith("    "):
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


def test_the_tool_says_what_it_is_and_lists_every_command_with_an_example():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n\n")[1].startswith("vae-dist trains"), r.stdout  # what it is, first
    listed = {line.split()[0]: line for line in r.stdout.splitlines() if re.match(r"^    \S", line)}
    for command in COMMANDS:
        assert command in listed and len(listed[command].split()) > 3, f"{command} has no one-line summary"
    assert "examples:" in r.stdout and "vae-dist demo" in r.stdout and "vae-dist train --data.shards" in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_meaning_and_its_default(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert not re.search(r"\b(null|None)\b", r.stdout), r.stdout
    entries = _entries(r.stdout.split("\nconfig keys")[0])  # train's config keys: test_config
    for action in SUBCOMMANDS[command]._actions:
        if action.dest == "help":
            continue
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        if isinstance(name, tuple) or action.choices and not action.option_strings:
            name = "{" + ",".join(action.choices) + "}"
        meaning = entries.get(name)
        assert meaning is not None, f"{command}: {name} missing from --help: {r.stdout}"
        assert len(meaning) > 8, f"{command} {name} has no description: {meaning!r}"
        if not action.option_strings and not action.choices:  # a path: which kind
            assert re.search(r"\b(file|folder)\b", meaning), f"{command} {name} does not say file or folder: {meaning!r}"
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in meaning, f"{command} {name} does not show its default: {meaning!r}"


def test_bench_help_gives_the_batch_sweep_the_code_runs():
    from vae_dist.bench import GPU_BATCH_SIZES

    r = run_cli("bench", "step", "--help")  # issue 44, item 10: each benchmark's options in its own help
    assert GPU_BATCH_SIZES in " ".join(r.stdout.split()), r.stdout


def test_a_command_run_in_the_test_process_prints_and_warns_as_a_fresh_process_would():
    """tests/in_process.py, which most tests run `vae-dist` through: what C writes to fd 2 is
    captured with Python's output, a warning shows in every call (a fresh process's once-per-place
    memory) while DeprecationWarning stays hidden, and the call's environment is its own."""
    import os
    import warnings

    from .in_process import process_like

    for _ in range(2):
        with process_like({"VAE_DIST_TEST_VAR": "1"}) as texts:
            print("to stdout")
            os.write(2, b"from C\n")
            warnings.warn("careful", FutureWarning, stacklevel=1)
            warnings.warn("old", DeprecationWarning, stacklevel=1)
            assert os.environ["VAE_DIST_TEST_VAR"] == "1"
        out, err = texts
        assert out == "to stdout\n" and "from C" in err and "FutureWarning: careful" in err, (out, err)
        assert "DeprecationWarning" not in err, err
    assert "VAE_DIST_TEST_VAR" not in os.environ
