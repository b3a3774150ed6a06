"""A damaged or hand-edited shard set (issue 43): the manifest, the `.idx` files and the tars
disagree, and every command (verify, training under either loader) says so in one line."""

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from vae_dist.data.shards import ShardSet, ShardWriter
from vae_dist.data.verify import verify
from vae_dist.errors import DataError

from .conftest import with_loader
from .test_faults import _one_line
from .test_faults import _train as _train_run


def _train(shards: Path, run: Path, loader: str):
    return _train_run(shards, run, f"--data.loader={loader}", "--train.max_steps=4")


def _error_line(r) -> str:
    """The run's one stderr line (exit 2, no traceback), without the `vae-dist: error: ` prefix."""
    line = _one_line(r)
    assert line.startswith("vae-dist: error: "), line
    return line.removeprefix("vae-dist: error: ")


def _verify(capsys, out: Path) -> tuple[str, str]:
    """`vae-dist verify OUT` in this process (no CUDA state: also on a GPU machine): (its stdout,
    its one error line without the prefix)."""
    from vae_dist.cli import main

    code = main(["verify", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vae-dist: error: "), (code, captured.err)
    return captured.out, lines[0].removeprefix("vae-dist: error: ")


def _copy(shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the session's shard set (it is shared: never damaged in place) and its manifest."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out, json.loads((out / "manifest.json").read_text())


def _save(out: Path, manifest) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest))


def _edit_index_line(idx: Path, line: int, field: int, value: str) -> None:
    """Sets one field of one `.idx` line (line 1 is the header; fields: ext offset size name ...)."""
    lines = idx.read_text().splitlines()
    fields = lines[line - 1].split()
    fields[field] = value
    lines[line - 1] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n")


def _record(out: Path, shard: dict) -> None:
    """A rewritten tar's size and sha256 into its manifest entry (what a careless fix-up does)."""
    tar = out / shard["file"]
    shard["bytes"], shard["sha256"] = tar.stat().st_size, hashlib.sha256(tar.read_bytes()).hexdigest()


# issue 43, case 8: a shard holding more samples than the manifest says, totals kept consistent
@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
@pytest.mark.parametrize("how", ["counts edited down", "a sample appended"])
def test_a_shard_with_more_samples_than_the_manifest_says_is_refused_alike_by_both_loaders(shards, tmp_path,
                                                                                            loader, how):
    out, manifest = _copy(shards, tmp_path)
    entry = manifest["splits"]["train"]["shards"][0]
    tar, idx = out / entry["file"], out / entry["index"]
    if how == "counts edited down":  # the shard's count and the split's, together: the totals agree
        entry["count"] -= 4
        manifest["splits"]["train"]["count"] -= 4
    else:  # the tar written again with one more sample, its .idx matching it, the manifest's count kept
        with tarfile.open(tar) as t:
            members = [(m.name, t.extractfile(m).read()) for m in t]
        writer = ShardWriter(tar)
        for (jpg_name, jpeg), (_, label) in zip(members[::2], members[1::2]):
            writer.write(jpg_name.partition(".")[0], jpeg, int.from_bytes(label, "little"))
        writer.write("extra", members[0][1], 0)
        entry.update({k: v for k, v in writer.close().items() if k != "count"})
    _save(out, manifest)
    held = 64 if how == "counts edited down" else 65
    said = held - (4 if how == "counts edited down" else 1)
    assert _error_line(_train(out, tmp_path / "run", loader)) == (
        f"shard {tar.name} holds {held} samples ({idx} lists them), manifest.json says {said}: the shards and "
        f"their manifest disagree; `vae-dist verify {out}` checks every shard, and packing again replaces them")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a step trained on it
    assert f"{tar.name}: {held} samples, manifest says {said}" in verify(out)


# issue 43, case 10: verify checks every .idx line against the tar's members
def test_verify_names_the_index_line_whose_offset_or_size_is_not_the_tars(shards, tmp_path, capsys):
    out, manifest = _copy(shards, tmp_path)
    idx = out / "train-000001.idx"
    offset = idx.read_text().splitlines()[2].split()[1]  # line 3: the second sample's jpg
    name = idx.read_text().splitlines()[2].split()[3]
    _edit_index_line(idx, 3, 1, "99999999")
    _edit_index_line(out / "train-000002.idx", 5, 6, "7")  # a label's size
    label = (out / "train-000002.idx").read_text().splitlines()[4].split()[7]
    _edit_index_line(out / "val-000000.idx", 2, 3, "0000999_other.jpg")  # a key
    first = (shards / "val-000000.idx").read_text().splitlines()[1].split()[3]
    assert verify(out) == [
        "train-000001.idx: sha256 mismatch (edited or damaged)",
        f"train-000001.idx: line 3 puts {name} at offset 99999999, the tar holds it at {offset}: the index does not "
        f"match its tar",
        "train-000002.idx: sha256 mismatch (edited or damaged)",
        f"train-000002.idx: line 5 gives {label} 7 bytes, the tar holds 4: the index does not match its tar",
        "val-000000.idx: sha256 mismatch (edited or damaged)",
        f"val-000000.idx: line 2 names 0000999_other.jpg, where the tar holds {first}: the index does not match its "
        f"tar",
    ]
    printed, line = _verify(capsys, out)
    assert "train-000001.idx: line 3 puts" in printed
    assert line == f"{out}: 6 problems with the shards (listed above): pack them again from the source images"


# issue 43, case 10: a run on an edited .idx stops in one line (the digest pack records), under either loader
@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_training_on_an_edited_index_is_one_line(shards, tmp_path, loader):
    out, _ = _copy(shards, tmp_path)
    _edit_index_line(out / "train-000000.idx", 2, 1, "99999999")
    assert _error_line(_train(out, tmp_path / "run", loader)) == (
        f"corrupt shard index {out / 'train-000000.idx'}: its sha256 is not the one manifest.json records (edited or "
        f"damaged): `vae-dist verify {out}` names the line, packing again replaces it")


# issue 43, case 10: an older pack's index (no digest recorded): an offset past the tar's end is
# refused as the index is read; sizes that make every JPEG empty are the first sample's one line
# (DALI fails as its iterator is made: it was a traceback, torch.frombuffer's ValueError)
@pytest.mark.parametrize("loader", with_loader("dali"))
def test_an_index_without_a_digest_is_checked_as_it_is_read(shards, tmp_path, loader):
    out, manifest = _copy(shards, tmp_path)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            del entry["index_sha256"]  # as packs before issue 43 wrote them
    _save(out, manifest)
    idx = out / "train-000000.idx"
    original = idx.read_text()
    jpg_size = int(original.splitlines()[1].split()[2])
    _edit_index_line(idx, 2, 1, "99999999")
    assert _error_line(_train(out, tmp_path / "run", loader)) == (
        f"corrupt shard index {idx}: line 2 puts its jpg at bytes 99999999-{99999999 + jpg_size}, past the end of "
        f"its tar ({(out / 'train-000000.tar').stat().st_size} bytes): `vae-dist verify {out}` checks every line, "
        f"packing again replaces it")
    # every train JPEG 0 bytes long: DALI fails on the first batches as its iterator is made
    idx.write_text(original)
    for tar_idx in out.glob("train-*.idx"):
        lines = tar_idx.read_text().splitlines()
        tar_idx.write_text("\n".join(lines[:1] + [" ".join(f if k != 2 else "0" for k, f in enumerate(line.split()))
                                                  for line in lines[1:]]) + "\n")
    line = _error_line(_train(out, tmp_path / "run2", loader))
    assert line.startswith("train sample ") and "does not decode (an empty image): the shard is damaged; " in line


# issue 43, case 11: manifest entries naming files outside the shard folder
@pytest.mark.parametrize("key, value", [("file", "/tmp/elsewhere/train-000000.tar"), ("index", "../train-000000.idx"),
                                        ("file", "sub/../../x.tar"), ("index", "..")])
def test_a_manifest_entry_outside_the_shard_folder_is_refused_by_every_command(shards, tmp_path, capsys, key,
                                                                              value):
    out, manifest = _copy(shards, tmp_path)
    manifest["splits"]["train"]["shards"][1][key] = value
    _save(out, manifest)
    expected = (f"corrupt {out / 'manifest.json'}: splits.train.shards[1].{key} should be a bare file name (nothing "
                f"outside the shard folder is read), got {value!r} (pack the shards again)")
    assert _verify(capsys, out)[1] == expected
    with pytest.raises(DataError) as e:
        ShardSet.open(out)  # what train, eval, viz, encode and bench open
    assert str(e.value) == expected


@pytest.mark.parametrize("loader", with_loader("webdataset"))
def test_training_never_reads_a_shard_outside_its_folder(shards, tmp_path, loader):
    """issue 43, case 11, as a run meets it: a manifest pointing at a tar elsewhere."""
    out, manifest = _copy(shards, tmp_path)
    elsewhere = tmp_path / "elsewhere.tar"
    shutil.copy(out / "train-000000.tar", elsewhere)
    manifest["splits"]["train"]["shards"][0]["file"] = str(elsewhere)
    _save(out, manifest)
    assert _error_line(_train(out, tmp_path / "run", loader)) == (
        f"corrupt {out / 'manifest.json'}: splits.train.shards[0].file should be a bare file name (nothing outside "
        f"the shard folder is read), got {str(elsewhere)!r} (pack the shards again)")


# issue 43, case 17: link members in a tar under the webdataset loader
@pytest.mark.parametrize("loader", with_loader("webdataset"))
@pytest.mark.parametrize("link", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hard link"])
def test_link_members_under_the_webdataset_loader_are_one_line(shards, tmp_path, loader, link):
    out, manifest = _copy(shards, tmp_path)
    keys = []
    for entry in manifest["splits"]["train"]["shards"]:  # each shard's first JPEG: the first sample read
        tar = out / entry["file"]
        with tarfile.open(tar) as t:
            members = [(m, t.extractfile(m).read()) for m in t]
        with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
            first, _ = members[0]
            member = tarfile.TarInfo(first.name)
            member.type, member.linkname = link, "/etc/passwd" if link == tarfile.SYMTYPE else members[1][0].name
            t.addfile(member)
            for m, data in members[1:]:
                t.addfile(m, io.BytesIO(data))
        keys.append((tar, first.name.partition(".")[0]))
        _record(out, entry)
    _save(out, manifest)
    line = _error_line(_train(out, tmp_path / "run", loader))
    assert any(line == f"sample {key} in {tar} lacks jpg (a link or other member that is not a file, or none): the "
                       f"shard is damaged; `vae-dist verify {out}` checks every shard, and packing again replaces it"
               for tar, key in keys), line
    kind = "symlink" if link == tarfile.SYMTYPE else "hard link"
    tar, key = keys[0]
    assert f"{tar.name}: member {key}.jpg is a {kind}, not a file (pack again: shards hold files only)" in verify(out)


# issue 43, case 18: a manifest of the wrong shape, under verify and every command that reads one
@pytest.mark.parametrize("edit, words", [
    pytest.param(lambda m: m["splits"]["train"].update(count="abc"),
                 "splits.train.count should be a whole number (0 or more), got 'abc'", id="count"),
    pytest.param(lambda m: m["splits"]["train"].update(shards="abc"),
                 "splits.train.shards should be a list of shards, got 'abc'", id="shards"),
    pytest.param(lambda m: m["splits"]["val"]["shards"].__setitem__(0, "val-000000.tar"),
                 "splits.val.shards[0] should be an object with 'file', 'index', 'count', 'bytes' and 'sha256', "
                 "got 'val-000000.tar'", id="shard"),
    pytest.param(lambda m: m["splits"]["val"]["shards"][0].update(bytes=-1),
                 "splits.val.shards[0].bytes should be a whole number (0 or more), got -1", id="bytes"),
    pytest.param(lambda m: m.update(splits=[1, 2]), "splits should be an object of split -> its shards, got a list",
                 id="splits"),
    pytest.param(lambda m: m.update(image_size=True), "image_size should be a positive whole number of pixels, "
                                                      "got True", id="image_size"),
    pytest.param(lambda m: m.update(classes="n01"), "classes should be a list of class names, got 'n01'", id="classes"),
    pytest.param(lambda m: [m], "the file should be a JSON object, got a list", id="top-level list"),
    pytest.param(lambda m: m.pop("splits") and m, "no valid 'splits'", id="no splits"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line_naming_the_key(shards, tmp_path, capsys, edit, words):
    out, manifest = _copy(shards, tmp_path)
    edited = edit(manifest)
    _save(out, manifest if edited is None else edited)
    expected = f"corrupt {out / 'manifest.json'}: {words} (pack the shards again)"
    assert _verify(capsys, out)[1] == expected
    with pytest.raises(DataError) as e:
        ShardSet.open(out)
    assert str(e.value) == expected


@pytest.mark.parametrize("loader", with_loader("webdataset"))
def test_training_on_a_manifest_of_the_wrong_shape_is_one_line(shards, tmp_path, loader):
    """issue 43, case 18, as a run meets it."""
    out, manifest = _copy(shards, tmp_path)
    manifest["splits"]["train"]["shards"][2]["count"] = "64"
    _save(out, manifest)
    assert _error_line(_train(out, tmp_path / "run", loader)) == (
        f"corrupt {out / 'manifest.json'}: splits.train.shards[2].count should be a whole number (0 or more), "
        f"got '64' (pack the shards again)")
