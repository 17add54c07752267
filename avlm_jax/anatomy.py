"""The 29 Chest ImaGenome anatomical regions: the one source of truth for names, order and ids.

The order is the one RGRG (ttanida/rgrg) and most Chest ImaGenome work use; anatomy token `i` of
the model, row `i` of every `(…, 29, 4)` box array and phrase slot `i` of every record all mean
region `REGIONS[i]`. Names are spelled exactly as the scene graphs' `bbox_name` field.
"""

from __future__ import annotations

import difflib
from typing import NamedTuple


class Region(NamedTuple):
  id: int
  name: str
  side: str  # 'right', 'left' or 'midline' (patient side, not image side)


_NAMES = (
    "right lung",
    "right upper lung zone",
    "right mid lung zone",
    "right lower lung zone",
    "right hilar structures",
    "right apical zone",
    "right costophrenic angle",
    "right hemidiaphragm",
    "left lung",
    "left upper lung zone",
    "left mid lung zone",
    "left lower lung zone",
    "left hilar structures",
    "left apical zone",
    "left costophrenic angle",
    "left hemidiaphragm",
    "trachea",
    "spine",
    "right clavicle",
    "left clavicle",
    "aortic arch",
    "mediastinum",
    "upper mediastinum",
    "svc",
    "cardiac silhouette",
    "cavoatrial junction",
    "right atrium",
    "carina",
    "abdomen",
)


def _side(name: str) -> str:
  if name.startswith("right "):
    return "right"
  if name.startswith("left "):
    return "left"
  return "midline"


REGIONS: tuple[Region, ...] = tuple(Region(i, n, _side(n)) for i, n in enumerate(_NAMES))
REGION_NAMES: tuple[str, ...] = _NAMES
NUM_REGIONS: int = len(REGIONS)
_ID_BY_NAME = {r.name: r.id for r in REGIONS}


def region_id(name: str) -> int:
  """Id of a region by its Chest ImaGenome name; a clear KeyError (with suggestions) otherwise."""
  try:
    return _ID_BY_NAME[name]
  except KeyError:
    close = difflib.get_close_matches(name, _NAMES, n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise KeyError(f"unknown anatomical region {name!r}.{hint} Known: {list(_NAMES)}") from None


def mirror(name: str) -> str:
  """The same region on the other side ('right lung' <-> 'left lung').

  Regions without a counterpart (midline ones, 'right atrium') map to themselves.
  """
  region = REGIONS[region_id(name)]
  other = {"right": "left ", "left": "right "}.get(region.side)
  if other is None:
    return name
  candidate = other + name.split(" ", 1)[1]
  return candidate if candidate in _ID_BY_NAME else name


assert NUM_REGIONS == 29, NUM_REGIONS
