"""What a worker uses to count for the metrics endpoint: checked names, cached rows, bounded tenants.

A thin layer over `shm.series.SeriesTable` that checks each (family, labels) against the catalogue the
first time it is used, so a misspelt metric fails in the tests, not silently in production, and then
costs one dict lookup and one shared-memory add per update.
"""

from __future__ import annotations

from neurondb.observability.families import BY_NAME, OTHER, TENANT_LABELS
from neurondb.shm.control import SharedState
from neurondb.shm.series import SeriesTable


class Recorder:
    def __init__(self, table: SeriesTable | None, writer: str) -> None:
        self.table = table
        self.writer = writer
        self._rows: dict[tuple[str, tuple[str, ...]], int] = {}

    @classmethod
    def attach(cls, shared: SharedState, writer: str) -> Recorder:
        """The recorder of `writer` (a worker's name, or "supervisor") on the installation's series table."""
        return cls(SeriesTable.attach(shared), writer)

    def inc(self, family: str, *labels: str, by: float = 1.0) -> None:
        if self.table is not None:
            self.table.inc(self._row(family, labels, ("counter",)), by)

    def set(self, family: str, *labels: str, value: float) -> None:
        if self.table is not None:
            self.table.set(self._row(family, labels, ("gauge",)), value)

    def observe(self, family: str, *labels: str, seconds: float) -> None:
        if self.table is not None:
            self.table.observe(self._row(family, labels, ("histogram",)), seconds)

    def tenant(self, tenant: str | None) -> str:
        """The label value for `tenant`: itself for the first TENANT_LABELS tenants, then "other"."""
        return OTHER if self.table is None else self.table.tenant_label(tenant, TENANT_LABELS, OTHER)

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None

    def _row(self, family: str, labels: tuple[str, ...], kinds: tuple[str, ...]) -> int:
        row = self._rows.get((family, labels))
        if row is None:
            spec = BY_NAME.get(family)
            if spec is None or spec.kind not in kinds or len(spec.labels) != len(labels):
                raise ValueError(f"metric {family}{labels!r} is not a {'/'.join(kinds)} of the catalogue "
                                 f"(families.FAMILIES)")
            assert self.table is not None
            row = self._rows[(family, labels)] = self.table.row(self.writer, family, labels)
        return row
