"""Parquet IO: exact round trips, shard layout, datasets compatibility."""

from __future__ import annotations

import numpy as np
import pytest
from dip_fixtures import make_record

from focusdpo.data.parquet import ShardWriter, read_records, shard_paths
from focusdpo.data.records import RecordError


def _same(a, b) -> None:
    assert a.id == b.id and a.prompt == b.prompt and a.m_d_patch == b.m_d_patch
    for name in ("positive", "negative", "regions", "m_prior", "m_d"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    for x, y in zip(a.references + a.ref_masks, b.references + b.ref_masks, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert (a.disruption, a.disrupted, a.params, a.source) == (b.disruption, b.disrupted, b.params, b.source)


def test_round_trip_exact_and_sharded(tmp_path):
    names = ["detail_erase", "patch_shuffle", "attribute_swap", "cross_paste"]
    recs = [make_record(i, k=1 + i % 3 if names[i % 4] in ("detail_erase", "patch_shuffle") else 2,
                        name=names[i % 4]) for i in range(11)]
    with ShardWriter(tmp_path, shard_records=4, row_group=3) as w:
        for r in recs:
            w.write(r)
    assert [p.name for p in shard_paths(tmp_path)] == ["data-00000.parquet", "data-00001.parquet",
                                                        "data-00002.parquet"]
    back = list(read_records(tmp_path))
    assert len(back) == 11
    for a, b in zip(recs, back, strict=True):
        _same(a, b)


def test_writer_refuses_broken_record(tmp_path):
    rec = make_record(0)
    rec.negative = rec.negative.copy()
    rec.negative[~rec.m_prior] ^= 1
    with pytest.raises(RecordError, match="outside m_prior"):
        ShardWriter(tmp_path).write(rec)


def test_datasets_reads_the_shards(tmp_path):
    import datasets

    with ShardWriter(tmp_path, shard_records=3) as w:
        for i in range(5):
            w.write(make_record(i))
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "data-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 5 and {"positive", "negative", "m_prior", "m_d", "disruption"} <= set(ds.column_names)
    assert sorted(ds["id"]) == sorted(f"r{i}" for i in range(5))
    assert ds.features["positive"] == datasets.Image() and ds.features["regions"] == datasets.List(datasets.Image())
    row = ds[0]  # decoded to PIL with no cast, pixel for pixel the record's arrays
    rec = make_record(int(row["id"][1:]))
    assert np.array_equal(np.asarray(row["positive"]), rec.positive)
    assert np.array_equal(np.asarray(row["m_prior"]) > 127, rec.m_prior)
    assert all(np.array_equal(np.asarray(im), ref) for im, ref in zip(row["references"], rec.references, strict=True))
    assert np.allclose(np.asarray(row["m_d"], dtype=np.float32).reshape(rec.m_d.shape), rec.m_d)


def test_schema_metadata_is_what_datasets_writes():
    """The ``huggingface`` key equals what ``datasets.Features`` itself produces for these columns."""
    import datasets

    from focusdpo.data.parquet import SCHEMA

    features = datasets.Features.from_arrow_schema(SCHEMA)
    assert features.arrow_schema.metadata == SCHEMA.metadata
    assert features.arrow_schema.types == SCHEMA.types


def test_shards_written_before_the_image_features_still_read(tmp_path):
    """Old shards: image columns as plain ``binary``; our reader and the training Dataset still decode them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from focusdpo.data.dataset import DipDataset
    from focusdpo.data.parquet import IMAGE, SCHEMA, record_to_row

    def old_type(tp):
        return pa.binary() if tp == IMAGE else pa.list_(pa.binary()) if tp == pa.list_(IMAGE) else tp

    def old_value(v):
        return v["bytes"] if isinstance(v, dict) else [old_value(x) for x in v] if isinstance(v, list) else v

    old = pa.schema([(f.name, old_type(f.type)) for f in SCHEMA])
    assert old.field("positive").type == pa.binary() and old.field("regions").type == pa.list_(pa.binary())
    recs = [make_record(i) for i in range(3)]
    rows = [{k: old_value(v) for k, v in record_to_row(r).items()} for r in recs]
    pq.write_table(pa.Table.from_pylist(rows, schema=old), tmp_path / "data-00000.parquet")
    for a, b in zip(recs, read_records(tmp_path), strict=True):
        _same(a, b)
    assert DipDataset(tmp_path)[1]["id"] == "r1"
