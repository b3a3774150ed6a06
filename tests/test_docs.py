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


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_readme_examples_write_where_git_ignores():
    readme = (ROOT / "README.md").read_text()
    outputs = re.findall(r"--(?:json|out|plot)[ =](\S+)", readme)
    outputs += re.findall(r"vae-dist sample \S+ (\S+)", readme)
    outputs += re.findall(r"--train\.out_dir=(\S+)", readme)
    outputs = sorted({o.strip("`") for o in outputs if not o.startswith(("/", "FILE", "DIR", "OUT"))})
    assert "runs/demo/eval.json" in outputs, outputs  # found the examples
    for out in outputs:
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", out], cwd=ROOT)
        assert r.returncode == 0, f"README example output {out} is not ignored by git"


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
