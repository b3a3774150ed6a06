"""The README stands alone: every link it (and docs/) makes resolves inside the repository,
and the outputs of its example commands land where git ignores them."""

import re
import shutil
import subprocess

import pytest

from .conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    text = page.read_text()
    links = LINK.findall(text)
    assert links or page.name != "README.md"
    for target in links:
        assert not re.match(r"^[a-z]+:", target), f"{page.name}: {target} leaves the repository"
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: {target} points outside the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"
    assert "../" not in text.replace("](../", "]("), f"{page.name} names a path outside the repository"


def _readme_commands() -> list[list[str]]:
    """The README's shell commands, as words: every line of its ```bash blocks (continuations
    joined, comments dropped), split where `;`/`&&` chain them."""
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = next((i for i, w in enumerate(words) if w in (";", "&&")), len(words))
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


# what a vae-dist command writes: its OUT argument (by position after the command) or an option's value
_OUT_POSITION = {"pack": 2, "sample": 2, "viz": 2, "sample-data": 1}
_OUT_OPTIONS = ("--out", "--json", "--plot", "--profile", "--train.out_dir")


def _outputs(words: list[str]) -> list[str]:
    outputs = []
    if "vae-dist" in words:
        args = words[words.index("vae-dist") + 1:]
        positional = [w for i, w in enumerate(args) if not w.startswith("-") and not
                      (i and args[i - 1] in _OUT_OPTIONS)]
        if positional and positional[0] in _OUT_POSITION and len(positional) > _OUT_POSITION[positional[0]]:
            outputs.append(positional[_OUT_POSITION[positional[0]]])
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        if name in _OUT_OPTIONS:
            outputs.append(value if eq else words[i + 1] if i + 1 < len(words) else "")
        if name == "--data.shards" and eq:  # an input a README command wrote before, kept in the checkout
            outputs.append(value)
    return outputs


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_readme_examples_write_where_git_ignores():
    """issue 44, item 10: a fresh clone's `git status` stays clean after every README command: what
    each writes (pack's OUT, --out/--json/--plot, train.out_dir) or is told to keep in the checkout
    (Tiny ImageNet as downloaded) is ignored by git. Placeholders (OUT, DIR) and paths outside the
    checkout (/shared/...) and URLs (s3://...) are not files of the clone."""
    readme = (ROOT / "README.md").read_text()
    outputs = [out for words in _readme_commands() for out in _outputs(words)]
    outputs += re.findall(r"--(?:json|out|plot)[ =](\S+)", readme)  # in the prose, too
    outputs += re.findall(r"--train\.out_dir=(\S+)", readme)
    outputs += ["tiny-imagenet-200.zip", "tiny-imagenet-200/"]  # "Get it once", then pack it from here
    # the launch scripts' default outputs, as the README names them (bench.sh, gpu_check.sh --smoke)
    outputs += [re.sub(r"[A-Z]+", "x", out) for out in re.findall(r"\b(runs/(?:bench|gpu-check)/[A-Z][A-Z-]*)/", readme)]
    outputs = sorted({o.strip("`") for o in outputs
                      if o and not o.startswith(("/", "$")) and not re.match(r"^[A-Z_]+\b", o) and "{" not in o
                      and "://" not in o})  # a URL is no file of the clone
    for expected in ("runs/demo/eval.json", "shards-128", "shards-64/", "runs/photos", "runs/demo/samples",
                     "runs/bench/x", "runs/gpu-check/x-x-x"):
        assert expected in outputs, outputs  # the parse found the examples
    for out in outputs:
        # a folder (shards/, whose README.md is tracked, or shards-128) is checked by a file it gets
        written = out if re.search(r"\.(json|npz|zip|png)$", out) else out.rstrip("/") + "/manifest.json"
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", written], cwd=ROOT)
        assert r.returncode == 0, f"README example output {written} is not ignored by git"


def test_the_demo_and_suite_times_are_stated_in_one_place():
    """issue 44, item 9: how long the demo and the test suite take is stated once, in the README's
    Set-up table (measured, with the machine and the date); the scripts and other pages point
    there, so the numbers cannot drift apart again. Dated measurement logs (docs/bench/) are the
    table's sources, not statements of it. A line that names the demo, the suite or their scripts
    with a number of minutes or seconds is a statement."""
    duration = re.compile(r"\b\d+(?:\.\d+)?\s*(?:min|minutes?|m\d+s|hours?|h|s|seconds?)\b")
    subject = re.compile(r"demo\.sh|\bdemo\b|test\.sh|\.ci/run|--fast|\bsuite\b", re.IGNORECASE)
    readme = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(readme) if line.startswith("How long they take, measured"))
    table_end = next(i for i in range(start + 3, len(readme)) if readme[i - 1].startswith("|") and not readme[i])
    assert any("demo.sh" in line and duration.search(line) for line in readme[start:table_end])  # the table is there
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "launch").glob("*.*"),
             *(ROOT / "vae_dist").rglob("*.py"), ROOT / ".ci" / "run", ROOT / "pyproject.toml"]
    stated = []
    for page in pages:
        for number, line in enumerate(page.read_text(errors="replace").splitlines()):
            in_table = page.name == "README.md" and start <= number < table_end
            if subject.search(line) and duration.search(line) and not in_table:
                stated.append(f"{page.relative_to(ROOT)}:{number + 1}: {line.strip()}")
    assert not stated, "times of the demo or the suite stated outside the README's Set-up table:\n" + "\n".join(stated)
