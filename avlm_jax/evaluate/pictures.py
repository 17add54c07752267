"""Matplotlib pictures of evaluation results, drawn on `Figure` objects (no pyplot global state, so
they work headless, in threads and in notebooks alike).

Boxes are xyxy in the pixels of the image they are drawn on.
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib import cm, colors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from avlm_jax import anatomy

# Regions drawn in the box picture: the large structures (all 29 overlap into a blur).
BOX_REGIONS = ("right lung", "left lung", "cardiac silhouette", "mediastinum", "trachea", "spine",
               "right costophrenic angle", "left costophrenic angle", "abdomen")


def cxcywh_to_xyxy(boxes: np.ndarray, size: float) -> np.ndarray:
  """Normalised (cx, cy, w, h) -> xyxy pixels of a `size`-square image."""
  b = np.asarray(boxes, np.float64)
  xy = np.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                 b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], axis=-1)
  return np.clip(xy, 0.0, 1.0) * size


def save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path


def png_bytes(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  return buf.getvalue()


def _image_axes(fig: Figure, image: np.ndarray, ax=None):
  ax = ax or fig.add_subplot(1, 1, 1)
  ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  ax.set_axis_off()
  return ax


def _region_color(r: int):
  return cm.tab20(r % 20)


def boxes_figure(image: np.ndarray, pred: np.ndarray, true: np.ndarray | None = None,
                 present: np.ndarray | None = None, regions: Sequence[str] = BOX_REGIONS,
                 title: str = "") -> Figure:
  """The radiograph with predicted (solid) and true (dashed) boxes of `regions`."""
  fig = Figure(figsize=(6, 6))
  ax = _image_axes(fig, image)
  for name in regions:
    r = anatomy.region_id(name)
    c = _region_color(r)
    x1, y1, x2, y2 = pred[r]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=c))
    ax.text(x1, y1, name, color=c, fontsize=7, va="bottom")
    if true is not None and (present is None or present[r]):
      x1, y1, x2, y2 = true[r]
      ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.0, ec=c, ls="--"))
  ax.set_title(title, fontsize=9)
  return fig


def region_heat_figure(image: np.ndarray, boxes: np.ndarray, probs: np.ndarray, findings: Sequence[str],
                       title: str = "", label_top: int = 6) -> Figure:
  """Each region's box filled by its top finding probability (larger regions underneath), and
  the `label_top` highest-scoring regions labelled with that finding."""
  fig = Figure(figsize=(7, 6))
  ax = _image_axes(fig, image)
  top = probs.max(axis=1)
  which = probs.argmax(axis=1)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  cmap, norm = cm.inferno, colors.Normalize(0, 1)
  for r in np.argsort(-area):
    x1, y1, x2, y2 = boxes[r]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fc=cmap(norm(top[r])), alpha=0.25 + 0.35 * top[r],
                           ec=cmap(norm(top[r])), lw=0.8))
  for r in np.argsort(-top)[:label_top]:
    ax.text(boxes[r, 0], boxes[r, 1], f"{anatomy.REGION_NAMES[r]}: {findings[which[r]]} {top[r]:.2f}",
            color="white", fontsize=6, va="bottom", bbox=dict(fc="black", alpha=0.5, pad=1, lw=0))
  fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, label="top finding probability")
  ax.set_title(title, fontsize=9)
  return fig


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]], title: str = "") -> Figure:
  """One ROC curve per class: {name: (fpr, tpr, thresholds, auc)}; undefined classes are listed."""
  fig = Figure(figsize=(5, 5))
  ax = fig.add_subplot(1, 1, 1)
  ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
  for name, (fpr, tpr, _, auc) in curves.items():
    if np.isfinite(auc):
      ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f})")
    else:
      ax.plot([], [], ls="none", label=f"{name} (undefined: one class absent)")
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title(title, fontsize=9)
  return fig


def table_heatmap(values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str = "",
                  vmin: float = 0.0, vmax: float = 1.0) -> Figure:
  """A rows × cols heatmap with values printed; NaN cells (undefined) are left blank."""
  values = np.asarray(values, np.float64)
  fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.28 * len(rows)))
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=7)
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      if np.isfinite(values[i, j]):
        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                color="white" if values[i, j] < (vmin + vmax) / 2 else "black")
  fig.colorbar(im, ax=ax, fraction=0.046)
  ax.set_title(title, fontsize=9)
  return fig


def segmentation_figure(images: np.ndarray, true: np.ndarray, pred: np.ndarray, structures: Sequence[str],
                        title: str = "") -> Figure:
  """Rows of examples: the image, true masks and predicted masks as coloured overlays with outlines."""
  n = len(images)
  fig = Figure(figsize=(6, 2.2 * n))
  palette = np.array([cm.tab10(k)[:3] for k in range(len(structures))])
  for i in range(n):
    for j, (label, masks) in enumerate((("image", None), ("true", true[i]), ("predicted", pred[i]))):
      ax = fig.add_subplot(n, 3, 3 * i + j + 1)
      _image_axes(fig, images[i], ax)
      if masks is not None:
        overlay = np.zeros(masks.shape[:2] + (4,))
        for k in range(len(structures)):
          overlay[masks[..., k]] = (*palette[k], 0.45)
        ax.imshow(overlay, interpolation="nearest")
        for k in range(len(structures)):  # outlines: overlapping structures (heart behind lung) stay visible
          if masks[..., k].any():
            ax.contour(masks[..., k].astype(float), levels=[0.5], colors=[palette[k]], linewidths=1.0)
      if i == 0:
        ax.set_title(label, fontsize=8)
  handles = [Rectangle((0, 0), 1, 1, fc=palette[k]) for k in range(len(structures))]
  fig.legend(handles, structures, loc="lower center", ncol=len(structures), fontsize=7)
  fig.suptitle(title, fontsize=9)
  return fig
