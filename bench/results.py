"""The samples a run collects: per metric, per tool, a list of values (one per repetition),
plus free-form extras (timelines for the plot, flip reports); saved as JSON as it goes."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    group: str
    target: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, tool: str) -> float | None:
        values = self.samples.get(tool)
        return statistics.median(values) if values else None


@dataclass
class Results:
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, tool: str, value: float, *, label: str, unit: str, group: str,
            target: str = "") -> None:
        metric = self.metrics.setdefault(key, Metric(key, label, unit, group, target))
        metric.samples.setdefault(tool, []).append(value)

    def save(self) -> None:
        document = {
            "meta": self.meta,
            "metrics": {k: {"label": m.label, "unit": m.unit, "group": m.group,
                            "target": m.target, "samples": m.samples}
                        for k, m in self.metrics.items()},
            "extra": self.extra,
            "errors": self.errors,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(document, indent=1))

    @classmethod
    def load(cls, path: Path) -> Results:
        document = json.loads(path.read_text())
        results = cls(path, document["meta"], extra=document.get("extra", {}),
                      errors=document.get("errors", []))
        for key, m in document["metrics"].items():
            results.metrics[key] = Metric(key, m["label"], m["unit"], m["group"],
                                          m.get("target", ""), m["samples"])
        return results
