"""What every converter shares: counting what was read and written, and the printed report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from nar4rec.data.format import EXPOSED, FEEDBACK, FormatSpec


@dataclass
class Counts:
    """Requests, exposed items and positive feedbacks (non-zero values) per behaviour."""

    requests: int = 0
    exposures: int = 0
    positives: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.exposures += other.exposures
        for b, c in other.positives.items():
            self.positives[b] = self.positives.get(b, 0) + c

    @classmethod
    def of_table(cls, table: pa.Table | pa.RecordBatch, spec: FormatSpec) -> Counts:
        """Count a batch of request-log rows (a request to rerank has no exposure)."""
        if not spec.has_labels:
            return cls(table.num_rows, 0, {})
        exposures = int(pc.sum(pc.list_value_length(table.column(EXPOSED))).as_py() or 0)
        positives = {}
        for b in spec.behaviours:
            values = pc.list_flatten(table.column(FEEDBACK + b))
            positive = pc.and_(pc.not_equal(values, 0), pc.is_finite(values))
            positives[b] = int(pc.sum(positive).as_py() or 0)
        return cls(table.num_rows, exposures, positives)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "exposures": self.exposures,
                "positives": dict(self.positives)}


@dataclass
class ConversionReport:
    """What a converter read, wrote per split, and set aside (with the reason)."""

    source: str
    read: Counts = field(default_factory=Counts)
    written: dict[str, Counts] = field(default_factory=dict)
    dropped: dict[str, Counts] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def written_total(self) -> Counts:
        total = Counts()
        for c in self.written.values():
            total.add(c)
        return total

    def balanced(self) -> bool:
        """True when every request, exposure and positive read was written or dropped."""
        total = self.written_total
        for c in self.dropped.values():
            total.add(c)
        return (total.requests == self.read.requests
                and total.exposures == self.read.exposures
                and all(total.positives.get(b, 0) == n for b, n in self.read.positives.items()))

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "read": self.read.as_dict(),
            "written": {k: v.as_dict() for k, v in self.written.items()},
            "dropped": {k: v.as_dict() for k, v in self.dropped.items()},
            "balanced": self.balanced(),
            "notes": list(self.notes),
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    def format(self) -> str:
        """A small table for the terminal."""
        rows = [("read", self.read)]
        rows += [(f"wrote {k}", v) for k, v in self.written.items()]
        rows += [(f"dropped: {k}", v) for k, v in self.dropped.items()]
        behaviours = list(self.read.positives) or sorted(
            {b for _, c in rows for b in c.positives})
        head = ["", "requests", "exposures", *[f"pos:{b}" for b in behaviours]]
        body = [[name, str(c.requests), str(c.exposures),
                 *[str(c.positives.get(b, 0)) for b in behaviours]] for name, c in rows]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                           for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
                 for r in [head, *body]]
        status = "every request, exposure and positive is accounted for" if self.balanced() \
            else "WARNING: counts do not add up"
        return "\n".join([f"{self.source}:", *lines, status, *self.notes])

