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
