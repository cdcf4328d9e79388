"""DIP data (DESIGN 2.7): records, disruptions, the builder, Parquet IO, manifest import, training loader."""

from focusdpo.data.disruptions import (
    DisruptionContext,
    DisruptionError,
    apply_disruption,
    register_disruption,
    registered_disruptions,
)
from focusdpo.data.records import DipRecord, RecordError

__all__ = [
    "DipRecord",
    "DisruptionContext",
    "DisruptionError",
    "RecordError",
    "apply_disruption",
    "register_disruption",
    "registered_disruptions",
]
