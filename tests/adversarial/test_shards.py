"""Damaged DIP sets and images (issue 15 point 5): truncated, corrupt or column-less shards and corrupt PNG rows
are named (shard, record id, row) with the fix, by the library and by `dip show` (exit 2, no traceback); the
intact records stay readable."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from focusdpo.cli import app
from focusdpo.config import load_config
from focusdpo.data import build_toy_dip, read_records
from focusdpo.data.dataset import DipDataset
from focusdpo.data.parquet import ShardError


@pytest.fixture(scope="module")
def dip_set(tmp_path_factory):
    """An 8-record toy set in 2 shards of 4 records."""
    out = tmp_path_factory.mktemp("shards") / "dip"
    build_toy_dip(load_config(None, ["data.shard_records=4"]), out, n=8, seed=0)
    return out


@pytest.fixture
def copy(dip_set, tmp_path):
    out = tmp_path / "dip"
    shutil.copytree(dip_set, out)
    return out


def _show(path, *extra: str):
    result = CliRunner().invoke(app, ["dip", "show", str(path), "--out", str(path.parent / "s.png"), *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def test_truncated_shard_is_named(copy) -> None:
    shard = copy / "data-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardError, match=rf"shard {shard} is not a readable Parquet file .*truncated or corrupt: "
                                         r"rebuild the set"):
        DipDataset(copy)
    assert f"shard {shard} is not a readable Parquet file" in _show(copy)
    with pytest.raises(ShardError, match=str(shard)):
        list(read_records(copy))
    assert len(list(read_records(copy / "data-00000.parquet"))) == 4  # the intact shard is still whole


def test_shard_without_columns_is_named(copy) -> None:
    shard = copy / "data-00000.parquet"
    pq.write_table(pa.table({"id": ["a", "b"]}), shard)
    with pytest.raises(ShardError, match=rf"shard {shard} lacks the column\(s\) \['prompt', .*not a DIP shard"):
        DipDataset(copy)
    assert "lacks the column(s)" in _show(copy)


def test_garbage_file_as_a_shard_is_named(copy) -> None:
    shard = copy / "data-00000.parquet"
    shard.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ShardError, match=rf"shard {shard} is not a readable Parquet file"):
        list(read_records(copy))


def test_corrupt_png_row_names_the_record_and_the_others_stay_readable(copy) -> None:
    shard = copy / "data-00000.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[2]["positive"] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}  # an image cell (datasets.Image)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    bad_id = rows[2]["id"]
    with pytest.raises(ShardError, match=rf"record '{bad_id}' \(row 2 of shard {shard}\) cannot be decoded "
                                         r"\(UnidentifiedImageError"):
        list(read_records(copy))
    ds = DipDataset(copy)
    assert [ds.record(i).id for i in (0, 1, 3)] == [rows[i]["id"] for i in (0, 1, 3)]
    with pytest.raises(ShardError, match=rf"record '{bad_id}' \(row 2 of row group 0 of shard {shard}\)"):
        ds.record(2)
    assert f"record '{bad_id}'" in _show(copy, "--n", "3")


def test_reference_decompression_bomb_and_16_bit_reference(tmp_path, monkeypatch) -> None:
    from focusdpo.sampling import read_image

    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(bomb)
    ref16 = tmp_path / "ref16.png"
    Image.fromarray(np.full((8, 8), 200 * 257, np.uint16)).save(ref16)
    assert float(read_image(str(ref16)).mul(255).round().unique()) == 200.0  # scaled, not clipped to white
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x the limit: PIL's bomb check fires
    with pytest.raises(ValueError, match=rf"reference image {bomb}: cannot be read \(Image size"):
        read_image(str(bomb))
