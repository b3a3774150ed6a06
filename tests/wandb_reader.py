"""Reads the records of a `.wandb` file (LevelDB-log framing of wandb's protobuf Records).
wandb is imported on use, so the test modules that import this collect without it."""

import struct
from pathlib import Path

HEADER = 7  # ':W&B' + magic (2 bytes) + version
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, chunks, out = HEADER, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            chunks = chunk
        elif kind == MIDDLE:
            chunks += chunk
        elif kind == LAST:
            out.append(chunks + chunk)
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def history_keys(path: Path) -> set[str]:
    keys = set()
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    return keys


def exit_code(path: Path) -> int | None:
    """The exit code the run was finished with, None if it was never finished."""
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "exit":
            return rec.exit.exit_code
    return None


def history_rows(path: Path) -> list[dict]:
    """Every logged row, as {key: value}."""
    import json

    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def preempting(path: Path) -> bool:
    """Whether the run was marked preempting (`run.mark_preempting()`)."""
    return any(rec.WhichOneof("record_type") == "preempting" for rec in read_records(path))
