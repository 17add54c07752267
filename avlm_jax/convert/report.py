"""What a checkpoint conversion did, key by key, so a silent partial load cannot go unnoticed."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ConversionReport:
  """`loaded`: model params (by '/' path) filled from the checkpoint; `created`: model params that
  keep the template's fresh init (new heads, anatomy tokens); `skipped`: checkpoint keys not used;
  `notes`: adaptations made on the way (channel sums, position-grid resizes)."""

  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  created: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    def listed(names: list[str], limit: int = 8) -> str:
      shown = ", ".join(names[:limit])
      return shown + (f", … (+{len(names) - limit} more)" if len(names) > limit else "")

    lines = [f"{self.source}: loaded {len(self.loaded)} params, created {len(self.created)}, "
             f"skipped {len(self.skipped)} checkpoint keys"]
    if self.created:
      lines.append(f"  created (fresh init): {listed(self.created)}")
    if self.skipped:
      lines.append(f"  skipped: {listed(self.skipped)}")
    lines.extend(f"  note: {n}" for n in self.notes)
    return "\n".join(lines)
