"""A multi-subject manifest from the DreamBench photos, for ``focusdpo dip build --manifest ... --auto-masks``.

DreamBench has no photo of two subjects together; UNO's multi-subject list pairs two single-subject photos. For
each pair (from UNO's list, or given as ``--pair a+b``) this writes a side-by-side target (photo ``00`` of each
subject, resized to ``--tile`` px squares, in the pair's order) and a manifest line whose references are
*other* photos of the subjects (``01``), without masks or classes: ``--auto-masks`` makes every mask and the
detector's queries come from the prompt ("a cat and a backpack in the jungle" -> cat, backpack)::

    python experiments/dreambench_multi_manifest.py --data shared/data/dreambench --out /tmp/dbm --n 3
    focusdpo dip build --manifest /tmp/dbm/manifest.jsonl --auto-masks --patch 16 --size 256 --ref-size 128 \\
        --out /tmp/dbm/dip "data.disruptions={attribute_swap: 1, cross_paste: 1}"
    focusdpo dip show /tmp/dbm/dip --out /tmp/dbm/sheet.png

(``data.mask_backend=auto``, the default: OWLv2 + SAM when they are cached or downloadable, else GrabCut in
strips, printed.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from focusdpo.eval.dreambench_data import load_entries


def write_manifest(data: str | Path, out: str | Path, pairs: list[tuple[str, str]] | None = None, n: int = 3,
                   tile: int = 256) -> Path:
    """Write ``out/targets/*.png``, ``out/refs/<subject>.jpg`` and ``out/manifest.jsonl``; returns the manifest.

    ``pairs`` None: the first ``n`` distinct subject pairs of UNO's multi-subject list, each with the prompt of
    its first entry; a given pair takes the prompt of its entry in the list (either order), else
    "a <a> and a <b>" with the folder names.
    """
    data, out = Path(data), Path(out)
    prompts: dict[tuple[str, str], str] = {}
    for e in load_entries(data, "dreambench-multi"):
        prompts.setdefault(e.subjects, e.prompt)  # type: ignore[arg-type]
    if pairs is None:
        pairs = list(prompts)[:n]
    (out / "targets").mkdir(parents=True, exist_ok=True)
    (out / "refs").mkdir(exist_ok=True)
    lines = []
    for a, b in pairs:
        prompt = prompts.get((a, b)) or _swapped(prompts.get((b, a))) or f"a {a} and a {b}"
        target = Image.new("RGB", (2 * tile, tile))
        for i, subject in enumerate((a, b)):
            with Image.open(data / "dataset" / subject / "00.jpg") as im:
                target.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (i * tile, 0))
            with Image.open(data / "dataset" / subject / "01.jpg") as im:
                im.convert("RGB").save(out / "refs" / f"{subject}.jpg", quality=95)
        name = f"{a}+{b}"
        target.save(out / "targets" / f"{name}.png")
        lines.append({"id": name, "prompt": prompt, "target": f"targets/{name}.png",
                      "references": [{"image": f"refs/{a}.jpg"}, {"image": f"refs/{b}.jpg"}]})
    path = out / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _swapped(prompt: str | None) -> str | None:
    """"a X and a Y <scene>" -> "a Y and a X <scene>" (a pair listed the other way round), else None."""
    from focusdpo.data.automask import prompt_subjects

    if prompt is None or (subjects := prompt_subjects(prompt, 2)) is None:
        return None
    x, y = subjects
    head = f"a {x} and a {y}"
    return f"a {y} and a {x}{prompt[len(head):]}" if prompt.startswith(head) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="DreamBench folder (dataset/, uno_dreambench_multiip.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=3, help="first N distinct pairs of UNO's list")
    p.add_argument("--pair", action="append", help="a+b (folder names), repeatable; replaces --n")
    p.add_argument("--tile", type=int, default=256)
    a = p.parse_args()
    pairs = [tuple(x.split("+", 1)) for x in a.pair] if a.pair else None
    print(write_manifest(a.data, a.out, pairs, a.n, a.tile))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
