"""`vae-dist index`: WebDataset tars another tool wrote (img2dataset's shape, made here), described
without repacking, verified, read by the real DALI CPU pipeline and the webdataset loader (images
of mixed sizes resized and centre-cropped), and trained on."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_dist.config import DataConfig
from vae_dist.data.index import IndexOptions, index_shards
from vae_dist.data.loaders import build_loader, decode_split
from vae_dist.data.shards import ShardIndex, ShardSet, split_name
from vae_dist.data.verify import verify

from .conftest import TINY_MODEL, needs_dali, run_cli, tmpfs, with_loader
from .foreign_shards import SPECIES, make_img2dataset
from .test_faults import _one_line

CPU = torch.device("cpu")
SIZE = 32  # small decodes: the point is the resize, not the pixels


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A pristine img2dataset-shaped folder (3 tars of 12, a png and a webp, a sample with no image,
    one with a spaced key) and what each sample should be; tests index copies of it."""
    folder = tmp_path_factory.mktemp("img2dataset") / "set"
    return folder, make_img2dataset(folder, cls=True)


def _copy(foreign, tmp_path) -> Path:
    out = tmp_path / "set"
    shutil.copytree(foreign[0], out)
    return out


def _keys(shard_set: ShardSet, split: str) -> list[str]:
    files = shard_set.files(split)
    return [split_name(line.split()[3])[0] for idx in files.idxs for line in Path(idx).read_text().splitlines()[1:]]


def _expected_label(truth: dict, label: str) -> int:
    if label in ("cls", "auto", "json:label"):
        return truth["label"]
    if label == "json:species":
        return sorted(SPECIES).index(truth["species"])
    return -1


# issue 45: each --label rule gives the labels the members hold, in side files the manifest records
@pytest.mark.parametrize("label", ["auto", "cls", "json:label", "json:species", "none"])
def test_each_label_rule_indexes_verifies_and_reads_the_labels(foreign, tmp_path, label):
    src = _copy(foreign, tmp_path)
    r = run_cli("index", str(src), "--label", label, "--image-size", str(SIZE), "--val-shards", "1")
    assert r.returncode == 0, r.stderr
    assert "skipped: 1 sample with no image member, 1 sample with whitespace in the key" in r.stdout, r.stdout
    manifest = json.loads((src / "manifest.json").read_text())
    assert manifest["format"] == "vae-dist-index/1" and manifest["resize"] is True
    assert manifest["image_size"] == SIZE and "shard_base" not in manifest
    assert manifest["label"] == {"auto": "cls"}.get(label, label)  # auto: the set has .cls members
    assert manifest.get("classes") == (sorted(SPECIES) if label == "json:species" else None)
    shard = manifest["splits"]["train"]["shards"][0]
    assert ("labels" in shard) == (label != "none")
    verified = run_cli("verify", str(src))
    assert verified.returncode == 0 and "all shards match manifest.json" in verified.stdout, verified.stdout
    shard_set = ShardSet.open(src)
    for split in ("train", "val"):
        files = shard_set.files(split)
        index = ShardIndex(files.tars, files.idxs, files.labels)
        assert index.labels.tolist() == [_expected_label(foreign[1][k], label) for k in _keys(shard_set, split)]
        index.close()
    assert shard_set.count("train") + shard_set.count("val") == len(foreign[1])  # every sample with an image


# issue 45: whole val shards, or a seeded fraction of samples (one tar, a train and a val .idx)
def test_val_shards_and_a_seeded_val_fraction(foreign, tmp_path):
    src = _copy(foreign, tmp_path)
    index_shards(src, opts=IndexOptions(image_size=SIZE, val_shards=1))
    whole = ShardSet.open(src)
    assert [Path(t).name for t in whole.files("val").tars] == ["00002.tar"]
    assert whole.count("val") == 12 and whole.count("train") == 24
    drawn = {}
    for seed in (3, 3, 4):
        index_shards(src, opts=IndexOptions(image_size=SIZE, val_fraction=0.25, seed=seed))
        shard_set = ShardSet.open(src)
        train, val = _keys(shard_set, "train"), _keys(shard_set, "val")
        assert len(val) == round(0.25 * 36) and not set(train) & set(val) and len(set(train) | set(val)) == 36
        assert drawn.setdefault(seed, val) == val  # the same seed draws the same samples
        assert sorted(p.name for p in src.glob("00001.*.idx")) == ["00001.train.idx", "00001.val.idx"]
        assert verify(src) == []
    assert drawn[3] != drawn[4]
    assert not (src / "00002.idx").exists() and len(list(src.glob("*.idx"))) == 6  # the whole-shard index is gone


# issue 45: the .idx is DALI's own format (wds2idx's lines) and DALI's reader takes a subset .idx
@needs_dali
def test_idx_is_wds2idx_format_and_dalis_webdataset_reader_reads_it(foreign, tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    src = _copy(foreign, tmp_path)
    index_shards(src, opts=IndexOptions(image_size=SIZE, val_fraction=0.0))
    wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    subprocess.run([wds2idx, str(src / "00001.tar"), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "ref.idx").read_text() == (src / "00001.train.idx").read_text()
    index_shards(src, opts=IndexOptions(image_size=SIZE, val_fraction=0.25, seed=1))
    listed = (src / "00000.train.idx").read_text().splitlines()
    keys = [split_name(line.split()[3])[0] for line in listed[1:]]

    @pipeline_def(batch_size=len(keys), num_threads=1, device_id=None)
    def read():
        image, meta = fn.readers.webdataset(paths=[str(src / "00000.tar")], index_paths=[str(src / "00000.train.idx")],
                                            ext=["jpg;png;webp", "json"], missing_component_behavior="error")
        return fn.decoders.image(image, device="cpu", output_type=types.RGB), meta

    pipe = read()
    pipe.build()
    assert pipe.epoch_size()["__Webdataset_0"] == int(listed[0].split()[1]) == len(keys)
    images, meta = pipe.run()
    assert [json.loads(bytes(meta.at(i)))["key"] for i in range(len(keys))] == keys  # the subset, in order
    assert [tuple(images.at(i).shape[:2]) for i in range(len(keys))] == \
        [foreign[1][k]["size"][::-1] for k in keys]  # (h, w) as written: png and webp too


def _reference(path_bytes: bytes) -> torch.Tensor:
    """PIL's decode, shorter side to SIZE, centre crop: what every loader should approximate."""
    import io

    img = Image.open(io.BytesIO(path_bytes)).convert("RGB")
    w, h = img.size
    scale = SIZE / min(w, h)
    img = img.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), Image.BICUBIC)
    left, top = (img.size[0] - SIZE) // 2, (img.size[1] - SIZE) // 2
    return torch.from_numpy(np.asarray(img.crop((left, top, left + SIZE, top + SIZE))).copy()).permute(2, 0, 1)


def _split_images(src: Path, loader: str, split: str):
    shard_set = ShardSet.open(src)
    cfg = DataConfig(shards=str(src), loader=loader, num_threads=1)
    ld = build_loader(shard_set, cfg, split, 8, rank=0, world=1, device=CPU, train=False, seed=0)
    try:
        xs, ys = zip(*ld.epoch(0))
    finally:
        ld.close()
    return torch.cat(xs), torch.cat(ys)


# issue 45: both loaders and the cpu-pool cache fill read a mixed-size foreign set as SxS images, labels right
@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_loaders_resize_and_centre_crop_mixed_sizes(foreign, tmp_path, loader):
    import tarfile

    src = _copy(foreign, tmp_path)
    index_shards(src, opts=IndexOptions(image_size=SIZE, label="json:label", val_fraction=0.3, seed=2))
    shard_set = ShardSet.open(src)
    keys = _keys(shard_set, "val")
    images, labels = _split_images(src, loader, "val")
    assert images.shape == (len(keys), 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert labels.tolist() == [foreign[1][k]["label"] for k in keys]
    members = {}
    for tar in sorted(src.glob("*.tar")):
        with tarfile.open(tar) as t:
            members.update({split_name(m.name)[0]: t.extractfile(m).read() for m in t
                            if split_name(m.name)[1] in ("jpg", "png", "webp")})
    for image, key in zip(images, keys):  # each image is its own sample's, resized and cropped (filters differ)
        assert (image.float() - _reference(members[key]).float()).abs().mean() < 6, key
    cached, cached_labels = decode_split(shard_set, DataConfig(shards=str(src), loader="webdataset", num_threads=2),
                                         "val", CPU)  # the cpu-pool fill: torchvision's decode and resize
    assert cached_labels.tolist() == labels.tolist()
    assert (cached.float() - images.float()).abs().mean() < (3 if loader == "dali" else 1e-6)


# issue 45: a foreign set trains by folder on both loaders; labels of -1 go through encode
@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_training_and_encode_on_an_indexed_set(foreign, tmp_path, loader):
    src = _copy(foreign, tmp_path)
    index_shards(src, opts=IndexOptions(image_size=SIZE, label="none", val_shards=1))
    run = tmp_path / "run"
    r = run_cli("train", f"--data.shards={src}", f"--train.out_dir={run}", *TINY_MODEL, "--train.batch_size=8",
                "--data.num_threads=1", "--log.wandb_mode=disabled", "--log.log_every=1", "--log.image_every=1000",
                "--train.eval_every=2", "--train.max_steps=2", f"--data.loader={loader}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "split" not in row] == [1, 2]
    assert any(row.get("split") == "val" for row in rows)
    r = run_cli("encode", str(run), "--split", "val", "--out", str(tmp_path / "val.npz"))
    assert r.returncode == 0, r.stderr[-2000:]
    encoded = np.load(tmp_path / "val.npz")
    assert encoded["labels"].tolist() == [-1] * 12 and encoded["mu"].shape[0] == 12


@pytest.fixture
def read_only_set(foreign, tmp_path):
    """The set on a real read-only filesystem (a tmpfs filled, then remounted ro: root cannot write it)."""
    ro = tmp_path / "ro"
    with tmpfs(ro, "size=8m"):
        for p in foreign[0].iterdir():
            shutil.copy(p, ro / p.name)
        if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only here")
        yield ro


# issue 45: a read-only source: refused in one line without --out; with --out the index records shard_base
@pytest.mark.parametrize("loader", with_loader("webdataset"))
def test_read_only_source_is_indexed_into_out(foreign, read_only_set, tmp_path, loader):
    r = run_cli("index", str(read_only_set))
    _one_line(r, f"cannot write into {read_only_set} (read-only?): give --out DIR")
    out = tmp_path / "index"
    r = run_cli("index", str(read_only_set), "--out", str(out), "--val-shards", "1", "--image-size", str(SIZE))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shard_base"] == "../ro"  # relative: the two folders move together
    assert manifest["splits"]["train"]["shards"][0]["file"] == "00000.tar"  # bare names, as pack's
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"0000{t}.{split}.{kind}" for t, split in ((0, "train"), (1, "train"), (2, "val")) for kind in ("idx", "labels")]
        + ["manifest.json"])
    r = run_cli("verify", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    images, labels = _split_images(out, loader, "val")
    assert images.shape == (12, 3, SIZE, SIZE) and labels.tolist() == [foreign[1][f"0000200{n:02d}"]["label"]
                                                                        for n in range(12)]  # auto: cls


# issue 45: verify names an edited label file and a tar changed since it was indexed
def test_verify_names_a_changed_labels_file_and_tar(foreign, tmp_path):
    src = _copy(foreign, tmp_path)
    index_shards(src, opts=IndexOptions(image_size=SIZE, label="cls", val_shards=1))
    (src / "00001.train.labels").write_bytes(b"\0" * 8)
    with open(src / "00002.tar", "r+b") as f:
        f.seek(700)
        f.write(b"x")
    problems = verify(src)
    assert "00001.train.labels: sha256 mismatch (edited or damaged)" in problems, problems
    assert "00001.train.labels: 8 bytes, 12 labels of 4 bytes are 48" in problems, problems
    assert "00002.tar: sha256 mismatch (corrupt, truncated or changed since it was indexed)" in problems, problems
    r = run_cli("train", f"--data.shards={src}", "--train.out_dir", str(tmp_path / "run"), *TINY_MODEL,
                "--train.batch_size=8", "--log.wandb_mode=disabled", "--train.max_steps=1")
    _one_line(r, "corrupt shard labels", "00001.train.labels", "`vae-dist index` again writes them anew")


# issue 45: bad input is one line each; a damaged tar is skipped, said, and recorded
def test_index_faults_are_one_line_each(foreign, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "00000.parquet").write_bytes(b"PAR1")
    _one_line(run_cli("index", str(empty)), f"no .tar files in {empty}")
    _one_line(run_cli("index", str(tmp_path / "nowhere")), "shard folder not found")
    src = _copy(foreign, tmp_path)
    _one_line(run_cli("index", str(src), "--label", "json:breed"),
              "--label json:breed: no sample's .json member holds the key 'breed'", "keys there: caption")
    _one_line(run_cli("index", str(src), "--label", "colour"), "--label must be auto, none, cls or json:KEY")
    _one_line(run_cli("index", str(src), "--val-shards", "3"), "--val-shards 3 leaves no train shard")
    _one_line(run_cli("index", str(src), "--val-shards", "1", "--val-fraction", "0.1"), "not both")
    plain = tmp_path / "plain"
    make_img2dataset(plain, tars=1, per_tar=3, extras=False)
    _one_line(run_cli("index", str(plain), "--label", "cls"), "--label cls: no sample has a .cls member")
    (src / "00001.tar").write_bytes((src / "00001.tar").read_bytes()[:5000])  # cut inside a member
    (src / "00003.tar").write_bytes(b"not a tar at all" * 64)
    r = run_cli("index", str(src), "--val-shards", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("index: skipped") == 2 and "Traceback" not in r.stderr, r.stderr
    assert "index: skipped 00001.tar: unreadable tar" in r.stderr, r.stderr
    assert "2 damaged tars: 00001.tar, 00003.tar" in r.stdout, r.stdout
    manifest = json.loads((src / "manifest.json").read_text())
    assert [d["file"] for d in manifest["skipped_tars"]] == ["00001.tar", "00003.tar"]
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == ["00000.tar"]
    assert verify(src) == []


# issue 45: a folder pack wrote is not taken over by index (its manifest is not index's)
def test_index_leaves_a_packed_folder_alone(shards, tmp_path):
    packed = tmp_path / "packed"
    shutil.copytree(shards, packed)
    before = (packed / "manifest.json").read_bytes()
    _one_line(run_cli("index", str(packed)), "is not one `vae-dist index` wrote", "--out DIR")
    assert (packed / "manifest.json").read_bytes() == before


# -- issue 45: index by URL ------------------------------------------------------------------
_RECORD = ("file", "index", "count", "bytes", "sha256", "index_sha256", "labels", "labels_sha256")


def _records(manifest: dict) -> dict:
    """Each split's shard records as a reader checks them (the index's own digests included)."""
    return {split: [{k: s.get(k) for k in _RECORD} for s in info["shards"]] for split, info in manifest["splits"].items()}


@pytest.fixture
def local_reference(foreign, tmp_path):
    """The foreign set indexed as a local folder (into --out, the source left as it is): what an
    index by URL must equal, record for record and byte for byte."""
    out = tmp_path / "local-index"
    manifest = index_shards(foreign[0], out, IndexOptions(image_size=SIZE, val_shards=1))
    return out, manifest


# issue 45: index by URL: an HTTP set by brace notation and by the server's autoindex, into --out
def test_index_by_url_over_http_brace_notation_and_autoindex(foreign, local_reference, http_server, tmp_path):
    shutil.copytree(foreign[0], http_server.root / "set")
    folder = http_server.url + "set/"
    ref_dir, ref = local_reference
    for n, source in enumerate((folder + "{00000..00002}.tar", folder)):
        out = tmp_path / f"index{n}"
        r = run_cli("index", source, "--out", str(out), "--val-shards", "1", "--image-size", str(SIZE))
        assert r.returncode == 0, r.stderr
        assert f"tars read from {folder}\n" in r.stdout and f"train with --data.shards={out}" in r.stdout, r.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["shard_base"] == folder and manifest["source"] == source
        assert _records(manifest) == _records(ref)  # each tar's name, bytes, sha256, count: as a local index's
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
        assert all((out / p.name).read_bytes() == p.read_bytes() for p in ref_dir.glob("*.idx"))
    assert {name: http_server.requests.get(f"set/0000{t}.tar") for t, name in enumerate("abc")} == \
        {"a": 2, "b": 2, "c": 2}  # each tar read once per index
    assert http_server.requests["set/"] == 1  # the autoindex page, once; the pattern lists nothing
    shard_set = ShardSet.open(out)  # a local index whose tars are at a URL opens (the loaders fetch them)
    assert shard_set.count("train") == 24 and shard_set.count("val") == 12
    assert verify(out) == []  # verify downloads each tar, checks it, deletes it
    assert http_server.requests["set/00001.tar"] == 3
    r = run_cli("verify", str(out))
    assert r.returncode == 0 and "all shards match manifest.json" in r.stdout, r.stdout + r.stderr


def _keys_under(s3, prefix: str) -> set[str]:
    listed = s3.client.list_objects_v2(Bucket=s3.name, Prefix=prefix)
    return {item["Key"][len(prefix):] for item in listed.get("Contents", [])}


# issue 45: index by URL: an S3 set indexed beside its tars (manifest.json uploaded last) and into --out
def test_index_by_url_on_s3_beside_and_into_out(foreign, local_reference, s3, tmp_path, monkeypatch):
    from vae_dist.data.remote import S3Remote

    url = s3.put_folder(foreign[0], "set")
    _, ref = local_reference
    writes = []  # the order the real uploads and deletes reach the bucket in
    upload, delete = S3Remote.upload, S3Remote.delete
    monkeypatch.setattr(S3Remote, "upload", lambda self, src, name: (writes.append(("put", name)), upload(self, src, name)))
    monkeypatch.setattr(S3Remote, "delete", lambda self, name: (writes.append(("delete", name)), delete(self, name)))
    r = run_cli("index", url, "--val-shards", "1", "--image-size", str(SIZE))
    assert r.returncode == 0, r.stderr
    assert f"train with --data.shards={url}" in r.stdout, r.stdout
    manifest = json.loads(s3.client.get_object(Bucket=s3.name, Key="set/manifest.json")["Body"].read())
    assert "shard_base" not in manifest and manifest["source"] == url and _records(manifest) == _records(ref)
    index_files = {f"0000{t}.{split}.{kind}" for t, split in ((0, "train"), (1, "train"), (2, "val"))
                   for kind in ("idx", "labels")}
    writes = [w for w in writes if not w[1].startswith(".vae-dist-index-probe")]  # the write probe, gone again
    assert writes[0] == ("delete", "manifest.json") and writes[-1] == ("put", "manifest.json")
    assert {name for kind, name in writes[1:-1]} == index_files and all(kind == "put" for kind, _ in writes[1:-1])
    originals = {p.name for p in foreign[0].iterdir()}
    assert _keys_under(s3, "set/") == originals | index_files | {"manifest.json"}  # no probe left behind
    # indexed again beside with another val split: the old split's files go, the tars stay
    r = run_cli("index", url, "--val-fraction", "0.25", "--image-size", str(SIZE))
    assert r.returncode == 0, r.stderr
    again = json.loads(s3.client.get_object(Bucket=s3.name, Key="set/manifest.json")["Body"].read())
    files = {s[k] for info in again["splits"].values() for s in info["shards"] for k in ("index", "labels")}
    assert "00002.val.idx" in files and "00002.train.idx" in files
    assert _keys_under(s3, "set/") == originals | files | {"manifest.json"}
    out = tmp_path / "index"
    r = run_cli("index", url, "--out", str(out), "--val-shards", "1", "--image-size", str(SIZE))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shard_base"] == url and _records(manifest) == _records(ref)
    assert verify(out) == []


# issue 45: index by URL: the WebDataset brace notation expands as webdataset's braceexpand does
def test_brace_notation_expands_as_webdatasets():
    import braceexpand

    from vae_dist.data.index_url import expand_braces, split_source

    for pattern in ("{00000..00012}.tar", "{0..3}.tar", "{a,b}-{000..002}.tar", "{7..5}.tar", "{09..11}.tar", "x.tar"):
        assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern)), pattern
    assert split_source("s3://b/set/{0..1}.tar") == ("s3://b/set/", ["0.tar", "1.tar"])
    assert split_source(" https://h/set ") == ("https://h/set/", None)


# issue 45: index by URL: no tars, no listing, a read-only HTTP source, a missing tar, a packed
# S3 set: one line each; 500 answers during the downloads are survived
def test_index_by_url_faults(foreign, local_reference, http_server, s3, tmp_path):
    shutil.copytree(foreign[0], http_server.root / "set")
    (http_server.root / "empty").mkdir()
    (http_server.root / "empty" / "00000.parquet").write_bytes(b"PAR1")
    folder, out = http_server.url + "set/", str(tmp_path / "out")
    _one_line(run_cli("index", http_server.url + "empty/", "--out", out), f"no .tar files at {http_server.url}empty/",
              "brace notation")
    _one_line(run_cli("index", http_server.url + "nowhere/", "--out", out), "no listing of this folder (HTTP 404)",
              "{00000..00009}.tar")
    _one_line(run_cli("index", folder), f"{folder} is read-only", "give --out DIR")
    _one_line(run_cli("index", folder + "{00000..00003}.tar", "--out", out), f"{folder}00003.tar: no such object")
    _one_line(run_cli("index", http_server.url + "{a,b}/00000.tar", "--out", out), "braces only in the tar names")
    _one_line(run_cli("index", s3.url("nothing"), "--out", out), f"no .tar files at {s3.url('nothing')}")
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing written by a run that failed
    packed = s3.put_folder(foreign[0], "packed")
    s3.put("packed/manifest.json", json.dumps({"image_size": 64, "splits": {}}).encode())
    _one_line(run_cli("index", packed), "manifest.json is not one `vae-dist index` wrote", "--out DIR")
    http_server.fail_next(100)
    _one_line(run_cli("index", folder + "{00000..00002}.tar", "--out", out, "--retries", "2"),
              f"{folder}0000", "unreachable after 2 tries", "HTTP 500")
    http_server.fail_next(0)
    before = http_server.requests.get("set/00000.tar", 0)
    http_server.fail_next(2)  # two 500s in the first tar's download: retried after a backoff
    manifest = index_shards(folder + "{00000..00002}.tar", out, IndexOptions(image_size=SIZE, val_shards=1),
                            backoff=0.01, jobs=1)
    assert _records(manifest) == _records(local_reference[1])
    assert http_server.requests["set/00000.tar"] - before == 3
