"""Reading an offline W&B run back (tests only): the records of its ``run-<id>.wandb`` transaction log.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version) then 32 KiB blocks of
chunks, each ``crc32 (4) | length (2, little endian) | kind (1)`` + data, kind 1 = a whole record, 2/3/4 = the
first/middle/last chunk of one; each record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows (``{"_step": ..., "train/loss": ..., ...}``) in order."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "config":
            out.update({item.key: json.loads(item.value_json) for item in r.config.update})
    return out
