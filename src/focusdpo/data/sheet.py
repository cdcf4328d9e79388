"""Contact sheet of a DIP set: one row per record, columns references | positive | negative | M_prior | M_d.

Every tile is scaled to ``cell`` pixels high (nearest neighbour when enlarging, so toy pixels stay sharp);
``M_prior`` is white on black; ``M_d`` (token resolution) is enlarged to the image size with nearest neighbour
and coloured with matplotlib's ``magma`` (black 0 .. light yellow 1). Each row is labelled with the record id
and its disruption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from focusdpo.data.dataset import DipDataset
from focusdpo.data.records import DipRecord

HEADERS = ("references", "positive", "negative", "M_prior", "M_d")
LABEL_H = 14


def _tile(arr: np.ndarray, cell: int) -> Image.Image:
    """uint8 ``[H, W, 3]`` or bool/float ``[H, W]`` -> RGB tile ``cell`` pixels high."""
    if arr.dtype == bool:
        arr = np.repeat((arr.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    im = Image.fromarray(arr)
    w = max(1, round(arr.shape[1] * cell / arr.shape[0]))
    resample = Image.Resampling.NEAREST if cell >= arr.shape[0] else Image.Resampling.LANCZOS
    return im.resize((w, cell), resample)


def _colour_map(m_d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float ``[h, w]`` in [0, 1] -> uint8 ``[H, W, 3]`` magma colours at ``size`` (H, W), nearest upsampling."""
    from matplotlib import colormaps

    rgb = (colormaps["magma"](np.clip(m_d, 0, 1))[..., :3] * 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.NEAREST))


def refs_width(rec: DipRecord, cell: int) -> int:
    """Width in pixels of the record's reference tiles side by side (2 px apart)."""
    return sum(max(1, round(r.shape[1] * cell / r.shape[0])) + 2 for r in rec.references) - 2


def record_row(rec: DipRecord, cell: int, slot_w: int) -> Image.Image:
    """One labelled row for ``rec``; the references take ``slot_w`` pixels so columns line up across rows."""
    tiles = [_tile(r, cell) for r in rec.references]
    cols = [_tile(rec.positive, cell), _tile(rec.negative, cell), _tile(rec.m_prior, cell),
            _tile(_colour_map(rec.m_d, rec.size), cell)]
    width = slot_w + sum(c.width + 6 for c in cols)
    row = Image.new("RGB", (width, cell + LABEL_H), (255, 255, 255))
    x = 0
    for t in tiles:
        row.paste(t, (x, LABEL_H))
        x += t.width + 2
    x = slot_w + 6
    for c in cols:
        row.paste(c, (x, LABEL_H))
        x += c.width + 6
    label = f"{rec.id}  {rec.disruption} {rec.params}  subjects {rec.disrupted} of K={rec.num_subjects}"
    ImageDraw.Draw(row).text((2, 1), label[:160], fill=(0, 0, 0))
    return row


def render_sheet(path: str | Path, out: str | Path, n: int = 6, start: int = 0, cell: int = 96) -> Path:
    """Write the contact sheet of records ``start .. start + n - 1`` of the DIP set at ``path`` to ``out``."""
    ds = DipDataset(path)
    if n < 1 or not 0 <= start < len(ds):
        raise ValueError(f"n={n} must be >= 1 and start={start} in [0, {len(ds)})")
    recs = [ds.record(i) for i in range(start, min(len(ds), start + n))]
    slot_w = max(refs_width(r, cell) for r in recs)
    rows = [record_row(r, cell, slot_w) for r in recs]
    header = Image.new("RGB", (max(r.width for r in rows), LABEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    x = slot_w + 6
    draw.text((2, 1), HEADERS[0], fill=(0, 0, 0))
    for name in HEADERS[1:]:
        draw.text((x, 1), name, fill=(0, 0, 0))
        x += round(cell * recs[0].size[1] / recs[0].size[0]) + 6
    sheet = Image.new("RGB", (header.width, LABEL_H + sum(r.height + 4 for r in rows)), (255, 255, 255))
    sheet.paste(header, (0, 0))
    y = LABEL_H
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 4
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
