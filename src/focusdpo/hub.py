"""Publishing to the Hugging Face Hub (issue 18.5): a finished run's LoRA, and a DIP set.

Both go through ``huggingface_hub``: ``HfApi.create_repo(exist_ok=True)`` then ``HfApi.upload_folder`` with an
allow-list, so only what is meant to be published leaves the machine (never checkpoints, tracker files or a
lock). The token is huggingface_hub's own: ``HF_TOKEN`` or the one saved by ``hf auth login``.

- :func:`push_run` (``focusdpo push RUN --repo ID``): a model repo with the model card ``README.md`` (written
  again with the repo id in its loading snippet), ``pytorch_lora_weights.safetensors`` (``export-lora`` is run
  first when the run folder lacks it), ``lora.safetensors``, ``config.yaml``, ``metrics.csv``, ``dip.json`` and
  the newest validation grids (``val/samples-step-N.png``, ``validation/step-N.png``).
- :func:`push_dip` (``focusdpo dip push DIR --repo ID``): a dataset repo with the Parquet shards, ``card.json``
  and a dataset card ``README.md`` whose ``configs`` front matter points the Hub's viewer at the shards (their
  image columns are ``datasets.Image()`` features, so the viewer shows images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_FILES = ("README.md", "pytorch_lora_weights.safetensors", "lora.safetensors", "config.yaml", "metrics.csv",
             "dip.json")
DIP_FILES = ("README.md", "card.json", "data-*.parquet")


class HubError(RuntimeError):
    """What to push is missing or incomplete; the message says what to do."""


def _api(endpoint: str | None, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, endpoint: str | None = None,
             token: str | None = None) -> str:
    """Create (or reuse) the model repo ``repo_id`` and upload the finished run; returns the commit URL."""
    from focusdpo.backbones.lora_export import WEIGHT_NAME, export_run
    from focusdpo.train.model_card import newest_samples, newest_user_validation, write_model_card

    run_dir = Path(run_dir)
    if not (run_dir / "lora.safetensors").is_file() or not (run_dir / "config.yaml").is_file():
        raise HubError(f"{run_dir} is not a finished run (no lora.safetensors or config.yaml): train it to the end "
                       f"(focusdpo train --resume train.output_dir={run_dir}) before pushing")
    if not (run_dir / WEIGHT_NAME).is_file():
        export_run(run_dir)
    write_model_card(run_dir, load_from=repo_id)
    allow = list(RUN_FILES)
    for grid in (newest_samples(run_dir), newest_user_validation(run_dir)):
        if grid is not None:
            allow.append(grid.relative_to(run_dir).as_posix())
    api = _api(endpoint, token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(run_dir), allow_patterns=allow,
                             commit_message=f"focusdpo push {run_dir.name}")
    return str(getattr(info, "commit_url", info))


def dataset_card(card: dict[str, Any], repo_id: str) -> str:
    """The dataset card (``README.md``) of a DIP set: front matter (the viewer's data files, tags), then what the
    records hold, the set's ``card.json`` and how to load it."""
    front = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data-*.parquet"}]}],
             "tags": ["focusdpo", "dip", "preference", "subject-driven-generation"], "license": "other"}
    import yaml

    body = [f"# DIP set: {repo_id}", "",
            "Disrupted-Instance Pairs for FocusDPO preference post-training: per record a prompt, K reference images "
            "with masks, a positive that keeps every subject, a negative disrupted only inside the subject regions "
            "(`m_prior`), the regions `P_k` and the DPCE map `m_d`. Images are `datasets.Image()` columns.", "",
            "```python", "from datasets import load_dataset", "",
            f'ds = load_dataset("{repo_id}", split="train")', "```", "",
            "Train on it with focusdpo: download it (`hf download --repo-type dataset "
            f"{repo_id} --local-dir dip/`) and set `data.path=dip/`.", "",
            "## card.json", "", "```json", json.dumps(card, indent=1, sort_keys=True), "```", ""]
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n" + "\n".join(body)


def push_dip(dip_dir: str | Path, repo_id: str, private: bool = False, endpoint: str | None = None,
             token: str | None = None) -> str:
    """Create (or reuse) the dataset repo ``repo_id`` and upload the DIP set in ``dip_dir``; returns the commit URL."""
    from focusdpo.data.parquet import shard_paths

    dip_dir = Path(dip_dir)
    card_path = dip_dir / "card.json"
    try:
        shard_paths(dip_dir)
        card = json.loads(card_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise HubError(f"{dip_dir} is not a built DIP set ({e}): build it with `focusdpo dip build`") from None
    if card.get("complete") is False:
        raise HubError(f"{card_path} says the build did not complete: finish it with `focusdpo dip build` first")
    (dip_dir / "README.md").write_text(dataset_card(card, repo_id))
    api = _api(endpoint, token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(dip_dir),
                             allow_patterns=list(DIP_FILES), commit_message=f"focusdpo dip push {dip_dir.name}")
    return str(getattr(info, "commit_url", info))
