"""Run summary of an ingest: per-file counts, totals and the conservation check."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class IngestSummary:
    """Counts of one ingest run, file by file."""

    files: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    data_version: str | None = None
    previous_data_version: str | None = None
    title: str = "ingest summary"

    def add(self, source_file: str, counts: dict[str, Any]) -> None:
        self.files.append({"source_file": source_file, **counts})

    def add_rejected(self, source_file: str, reason: str | None) -> None:
        self.rejected[source_file] = reason or "rejected"

    @property
    def files_committed(self) -> int:
        return len(self.files)

    def totals(self) -> dict[str, Any]:
        by_rule: Counter[str] = Counter()
        for entry in self.files:
            by_rule.update(entry["quarantined_by_rule"])
        total = {
            key: sum(entry[key] for entry in self.files)
            for key in ("rows_read", "stored", "quarantined", "duplicates")
        }
        total["quarantined_by_rule"] = dict(sorted(by_rule.items()))
        total["conserved"] = (
            all(
                e["rows_read"] == e["stored"] + e["quarantined"] + e["duplicates"]
                for e in self.files
            )
            and total["rows_read"] == total["stored"] + total["quarantined"] + total["duplicates"]
        )
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "files_ingested": self.files_committed,
            "files_rejected": self.rejected,
            "totals": self.totals(),
            "data_version": self.data_version,
            "previous_data_version": self.previous_data_version,
            "files": self.files,
        }

    def table(self) -> Table:
        totals = self.totals()
        table = Table(title=self.title)
        for name in ("files", "rows read", "stored", "quarantined", "duplicates", "conserved"):
            table.add_column(name, justify="right")
        table.add_row(
            str(self.files_committed),
            f"{totals['rows_read']:,}",
            f"{totals['stored']:,}",
            f"{totals['quarantined']:,}",
            f"{totals['duplicates']:,}",
            "yes" if totals["conserved"] else "NO",
        )
        return table

    def render_text(self) -> str:
        console = Console(width=110, record=True, file=None, force_terminal=False)
        with console.capture() as capture:
            console.print(self.table())
            totals = self.totals()
            if totals["quarantined_by_rule"]:
                rules = ", ".join(f"{k}: {v:,}" for k, v in totals["quarantined_by_rule"].items())
                console.print(f"quarantined by rule: {rules}")
            for name, reason in self.rejected.items():
                console.print(f"rejected file {name}: {reason}")
            if self.data_version and self.previous_data_version:
                console.print(
                    f"data version (data.dvc md5): {self.data_version} "
                    f"(previous: {self.previous_data_version})"
                )
            elif self.data_version:
                console.print(f"data version (data.dvc md5): {self.data_version}")
            elif self.files_committed == 0:
                console.print("nothing new: the store and data.dvc are unchanged")
        return capture.get()
