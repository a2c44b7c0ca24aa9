"""Values attached to micro-batch objects by identity.

A `PackedBatch` is a frozen dataclass of tensors, so it cannot be a dict key (its equality compares
tensors). Routing replay and routing metrics keep per-micro-batch routes from the old-policy forward
until the training forward of the same batch object: this table holds them, and drops an entry when
its batch is freed.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional


class PerBatch:
    def __init__(self) -> None:
        self._table: dict[int, tuple[weakref.ref, Any]] = {}

    def put(self, batch: object, value: Any) -> None:
        key = id(batch)
        ref = weakref.ref(batch, lambda _, key=key, table=self._table: table.pop(key, None))
        self._table[key] = (ref, value)

    def get(self, batch: object) -> Optional[Any]:
        """The value put for this very object, or None (also when the id was reused)."""
        entry = self._table.get(id(batch))
        return entry[1] if entry is not None and entry[0]() is batch else None
