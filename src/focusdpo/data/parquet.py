"""Parquet storage of DIP records: PNG bytes for images and masks, plain columns for metadata.

A built set is a folder ``DIR`` with ``data-00000.parquet, ...`` (shards), ``card.json`` and
``rejected.jsonl``. ``datasets.load_dataset("parquet", data_files=str(DIR / "data-*.parquet"))`` reads it and
decodes the images to PIL with no cast: image columns are stored the way ``datasets.Image()`` stores them
(``struct<bytes, path>``, ``path`` null) and the schema carries the ``huggingface`` metadata key naming the
features (:data:`HF_FEATURES`), which is also what the Hub's dataset viewer reads.

Columns (one row per record):

==================  =====================  ==========================================================
column              type                   content
==================  =====================  ==========================================================
id, prompt          string
num_subjects        int32                  K
height, width       int32                  H, W of the positive
positive, negative  image                  RGB PNG
m_prior             image                  greyscale PNG, 255 inside M_prior, 0 outside
regions             list<image>            K greyscale PNGs (P_k), reference order
references          list<image>            K RGB PNGs
ref_masks           list<image>            K greyscale PNGs
ref_heights/widths  list<int32>            sizes of the references (bucketing reads only these)
m_d                 list<float32>          DPCE map, row-major, shape (m_d_height, m_d_width)
m_d_height/width    int32
m_d_patch           int32                  pixels per token side of m_d
disruption          string                 name
disrupted           list<int32>            disrupted subject indices
params, source      string                 JSON
==================  =====================  ==========================================================

``image`` is ``struct<bytes: binary, path: string>``. Shards written before the image features (plain
``binary`` columns) are read as well.

Masks are written as 0/255 and read back as ``> 127``, so bool masks round-trip exactly; PNG is lossless, so
images do; ``m_d`` is stored as float32, so it round-trips bit for bit.

Reading a damaged set (issue 15): a shard that is not Parquet (truncated, corrupt) or lacks columns, and a row
whose bytes do not decode, raise :class:`ShardError` naming the shard, the record id and row, and the fix.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from focusdpo.data.records import DipRecord

SHARD_PATTERN = "data-*.parquet"

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image()'s storage

_COLUMNS = [
    ("id", pa.string()), ("prompt", pa.string()), ("num_subjects", pa.int32()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("positive", IMAGE), ("negative", IMAGE), ("m_prior", IMAGE),
    ("regions", pa.list_(IMAGE)), ("references", pa.list_(IMAGE)),
    ("ref_masks", pa.list_(IMAGE)), ("ref_heights", pa.list_(pa.int32())),
    ("ref_widths", pa.list_(pa.int32())),
    ("m_d", pa.list_(pa.float32())), ("m_d_height", pa.int32()), ("m_d_width", pa.int32()),
    ("m_d_patch", pa.int32()), ("disruption", pa.string()), ("disrupted", pa.list_(pa.int32())),
    ("params", pa.string()), ("source", pa.string()),
]


def _feature(tp: pa.DataType) -> dict[str, Any]:
    """The ``datasets`` feature (its JSON form) of one column type: Image, List or Value."""
    if tp == IMAGE:
        return {"_type": "Image"}
    if pa.types.is_list(tp):
        return {"feature": _feature(tp.value_type), "_type": "List"}
    names = {pa.string(): "string", pa.int32(): "int32", pa.float32(): "float32"}
    return {"dtype": names[tp], "_type": "Value"}


# ``datasets.Features`` of a shard, as ``datasets`` itself stores them under the schema metadata key "huggingface"
HF_FEATURES = {name: _feature(tp) for name, tp in _COLUMNS}
SCHEMA = pa.schema(_COLUMNS, metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})

# Columns small enough to read for a whole set when building the loader's index.
INDEX_COLUMNS = ["id", "num_subjects", "height", "width", "ref_heights", "ref_widths"]


class ShardError(ValueError):
    """A shard or one of its rows cannot be read; the message names the shard (and record) and the fix."""


_REBUILD = "rebuild the set with `focusdpo dip build`"


def open_shard(path: str | Path) -> pq.ParquetFile:
    """A shard opened for reading, its columns checked against :data:`SCHEMA` (:class:`ShardError` if not)."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow: ArrowInvalid (a ValueError) or ArrowIOError (an OSError)
        raise ShardError(f"shard {path} is not a readable Parquet file ({type(e).__name__}: {e}); it is truncated "
                         f"or corrupt: {_REBUILD}") from e
    missing = [n for n in SCHEMA.names if n not in pf.schema_arrow.names]
    if missing:
        raise ShardError(f"shard {path} lacks the column(s) {missing}: it is not a DIP shard of this version; "
                         f"{_REBUILD}")
    return pf


def decode_row(row: dict[str, Any], shard: str | Path, where: str) -> DipRecord:
    """:func:`row_to_record`, naming the shard, ``where`` (e.g. "row 3") and the record id when it cannot decode."""
    try:
        return row_to_record(row)
    except Exception as e:  # noqa: BLE001 - any decoder failure (PIL, JSON, numpy) is damaged data
        raise ShardError(f"record {row.get('id')!r} ({where} of shard {shard}) cannot be decoded "
                         f"({type(e).__name__}: {e}): {_REBUILD}") from e


def read_row_group(pf: pq.ParquetFile, group: int | None, shard: str | Path,
                   columns: list[str] | None = None) -> pa.Table:
    """Row group ``group`` (None: all rows) of ``columns`` of an open shard (:class:`ShardError` naming the shard
    if its bytes are damaged)."""
    try:
        return pf.read(columns=columns) if group is None else pf.read_row_group(group, columns=columns)
    except (OSError, ValueError) as e:
        raise ShardError(f"shard {shard}: row group {group} cannot be read ({type(e).__name__}: {e}): "
                         f"{_REBUILD}") from e


def encode_png(arr: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of uint8 ``[H, W, 3]`` (RGB) or bool ``[H, W]`` (stored as 0/255 greyscale)."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"encode_png takes uint8 [H, W, 3] or bool [H, W], got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes | dict[str, Any], mask: bool = False) -> np.ndarray:
    """Inverse of :func:`encode_png`: uint8 ``[H, W, 3]``, or bool ``[H, W]`` when ``mask``. ``data``: the PNG
    bytes, or an image cell ``{"bytes": ..., "path": None}`` (old shards hold plain bytes)."""
    if isinstance(data, dict):
        data = data["bytes"]
    with Image.open(io.BytesIO(data)) as im:
        if mask:
            return np.asarray(im.convert("L")) > 127
        return np.asarray(im.convert("RGB")).copy()


def _image(arr: np.ndarray) -> dict[str, Any]:
    """An image cell (``datasets.Image()`` storage) holding :func:`encode_png` of ``arr``."""
    return {"bytes": encode_png(arr), "path": None}


def record_to_row(rec: DipRecord) -> dict[str, Any]:
    """One Parquet row (a dict matching :data:`SCHEMA`) from a record."""
    return {
        "id": rec.id, "prompt": rec.prompt, "num_subjects": rec.num_subjects,
        "height": rec.size[0], "width": rec.size[1],
        "positive": _image(rec.positive), "negative": _image(rec.negative),
        "m_prior": _image(rec.m_prior), "regions": [_image(r) for r in rec.regions],
        "references": [_image(r) for r in rec.references], "ref_masks": [_image(m) for m in rec.ref_masks],
        "ref_heights": [int(r.shape[0]) for r in rec.references],
        "ref_widths": [int(r.shape[1]) for r in rec.references],
        "m_d": rec.m_d.astype(np.float32).ravel().tolist(), "m_d_height": int(rec.m_d.shape[0]),
        "m_d_width": int(rec.m_d.shape[1]), "m_d_patch": int(rec.m_d_patch),
        "disruption": rec.disruption, "disrupted": [int(s) for s in rec.disrupted],
        "params": json.dumps(rec.params, sort_keys=True), "source": json.dumps(rec.source, sort_keys=True),
    }


def row_to_record(row: dict[str, Any]) -> DipRecord:
    """Inverse of :func:`record_to_row`."""
    m_d = np.asarray(row["m_d"], dtype=np.float32).reshape(row["m_d_height"], row["m_d_width"])
    return DipRecord(
        id=row["id"], prompt=row["prompt"],
        positive=decode_png(row["positive"]), negative=decode_png(row["negative"]),
        regions=np.stack([decode_png(r, mask=True) for r in row["regions"]]),
        m_prior=decode_png(row["m_prior"], mask=True),
        references=[decode_png(r) for r in row["references"]],
        ref_masks=[decode_png(m, mask=True) for m in row["ref_masks"]],
        m_d=m_d, m_d_patch=int(row["m_d_patch"]), disruption=row["disruption"],
        disrupted=[int(s) for s in row["disrupted"]],
        params=json.loads(row["params"]), source=json.loads(row["source"]),
    )


class ShardWriter:
    """Writes records into ``out_dir/data-XXXXX.parquet`` shards of ``shard_records`` rows each.

    Rows are buffered and written in row groups of ``row_group`` rows, the unit the training Dataset reads.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, out_dir: str | Path, shard_records: int = 1000, row_group: int = 32) -> None:
        if shard_records < 1 or row_group < 1:
            raise ValueError(f"shard_records={shard_records} and row_group={row_group} must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_records, self.row_group = shard_records, row_group
        self._rows: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self.shards: list[Path] = []
        self.count = 0

    def write(self, rec: DipRecord) -> None:
        """Append one record (validated first, so a broken record never reaches a shard)."""
        rec.validate()
        self._rows.append(record_to_row(rec))
        self.count += 1
        if len(self._rows) >= self.row_group or self._in_shard + len(self._rows) >= self.shard_records:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            path = self.out_dir / f"data-{len(self.shards):05d}.parquet"
            self._writer = pq.ParquetWriter(path, SCHEMA)
            self.shards.append(path)
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA), row_group_size=self.row_group)
        self._in_shard += len(self._rows)
        self._rows = []
        if self._in_shard >= self.shard_records:
            self._writer.close()
            self._writer, self._in_shard = None, 0

    def close(self) -> None:
        """Flush the buffered rows and close the open shard."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard_paths(path: str | Path) -> list[Path]:
    """The sorted shards of a built set (a folder) or a single shard file; raises when there are none."""
    p = Path(path)
    files = sorted(p.glob(SHARD_PATTERN)) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no DIP shards ({SHARD_PATTERN}) at {p}; build them with `focusdpo dip build`")
    return files


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What identifies a built set's content cheaply: the SHA-256 of its ``card.json`` and its shard sizes.

    A run records it; a set rebuilt in place (other seed, records or settings) changes it.
    """
    import hashlib

    folder = Path(path)
    card = folder / "card.json" if folder.is_dir() else None
    digest = hashlib.sha256(card.read_bytes()).hexdigest() if card is not None and card.is_file() else None
    return {"card_sha256": digest, "shards": {p.name: p.stat().st_size for p in shard_paths(folder)}}


def write_records(records: Iterable[DipRecord], out_dir: str | Path, shard_records: int = 1000) -> list[Path]:
    """Write records into shards under ``out_dir``; returns the shard paths."""
    with ShardWriter(out_dir, shard_records) as w:
        for rec in records:
            w.write(rec)
    return w.shards


def read_records(path: str | Path) -> Iterator[DipRecord]:
    """Stream the records of a built set (folder) or shard file, one row group at a time."""
    for shard in shard_paths(path):
        pf = open_shard(shard)
        start = 0
        for g in range(pf.num_row_groups):
            rows = read_row_group(pf, g, shard).to_pylist()
            yield from (decode_row(r, shard, f"row {start + i}") for i, r in enumerate(rows))
            start += len(rows)
