"""A MIMIC-CXR free-text report (`files/p10/p10000032/s50414267.txt`) -> its FINDINGS and IMPRESSION.

Reports are plain text with upper-case section headers at line starts ('EXAMINATION:',
'INDICATION:', 'FINDINGS:', 'IMPRESSION:', sometimes 'FINDINGS AND IMPRESSION:'). The stored report
is the findings section then the impression, each under its header, whitespace collapsed. A report
with neither keeps its whole text (less the 'FINAL REPORT' banner); the converter counts those.
"""

from __future__ import annotations

import re

from data_pipelines.mimic import bad_input

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/,()-]*[A-Z)])[ \t]*:", re.MULTILINE)
_SPACE = re.compile(r"\s+")
_WANTED = ("FINDINGS", "IMPRESSION")


def sections(text: str) -> dict[str, str]:
  """Header -> its text (whitespace collapsed), in report order; a repeated header's texts are joined."""
  out: dict[str, str] = {}
  matches = list(_HEADER.finditer(text))
  for m, nxt in zip(matches, matches[1:] + [None]):
    body = _SPACE.sub(" ", text[m.end():nxt.start() if nxt else len(text)]).strip()
    name = m.group(1)
    out[name] = f"{out[name]} {body}".strip() if name in out else body
  return out


def extract(text: str) -> tuple[str, bool]:
  """(report text to store, whether it came from FINDINGS/IMPRESSION sections)."""
  parts = [f"{name}: {body}" for name, body in sections(text).items()
           if body and any(w in name for w in _WANTED)]
  if parts:
    return " ".join(parts), True
  return _SPACE.sub(" ", text.replace("FINAL REPORT", " ")).strip(), False


def read(path: str) -> tuple[str, bool]:
  """The stored report text of one study; BadInput(MISSING_REPORT) naming `path` when there is none."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except FileNotFoundError:
    raise bad_input.BadInput(bad_input.MISSING_REPORT, path, "the study has no report file") from None
  report, from_sections = extract(text)
  if not report:
    raise bad_input.BadInput(bad_input.MISSING_REPORT, path, "the report file is empty")
  return report, from_sections
