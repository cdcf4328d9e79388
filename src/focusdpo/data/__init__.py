"""DIP data (DESIGN 2.7): records, disruptions, the builder, Parquet IO, manifest import, training loader.

Heavy parts (the world, torch loaders) are imported by the functions that need them.
"""

from focusdpo.data.builder import BuildSummary
from focusdpo.data.dataset import DipDataset, collate_dip
from focusdpo.data.disruptions import (
    DisruptionContext,
    DisruptionError,
    apply_disruption,
    register_disruption,
    registered_disruptions,
)
from focusdpo.data.manifest import BadRecord
from focusdpo.data.parquet import read_records, write_records
from focusdpo.data.records import DipRecord, RecordError
from focusdpo.data.sources import build_manifest_dip, build_toy_dip, ensure_toy_dip

__all__ = [
    "BadRecord",
    "BuildSummary",
    "DipDataset",
    "DipRecord",
    "DisruptionContext",
    "DisruptionError",
    "RecordError",
    "apply_disruption",
    "build_manifest_dip",
    "build_toy_dip",
    "collate_dip",
    "ensure_toy_dip",
    "read_records",
    "register_disruption",
    "registered_disruptions",
    "write_records",
]
