"""An interactive Gradio app around a loaded checkpoint: upload a radiograph (DICOM, PNG or JPEG),
see its anatomy boxes, the regions' top findings and the image-level findings.

    from avlm_jax import demo_app, interpret
    demo_app.build_demo(interpret.load("workdir/tiny")).launch()   # inline in a notebook or Colab

`python -m launch.demo --checkpoint=...` serves the same app. Gradio is the optional `[demo]`
extra: it is imported here, inside `build_demo`, and nowhere else in the package.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from matplotlib import colors
from PIL import Image

from avlm_jax import anatomy
from avlm_jax.evaluate import pictures
from avlm_jax.evaluate.radiograph_io import ImageReadError

if TYPE_CHECKING:
  import gradio as gr
  import pandas as pd

  from avlm_jax.interpret import Interpretation, Interpreter

# The boxes view is drawn at this size at most: gradio paints one full-size mask per region, so a
# 2k DICOM would take seconds, and the browser shows it smaller anyway.
BOX_VIEW_PIXELS = 768
TOP_FINDINGS = 3

INTRO = """\
## Anatomy-VLM: radiograph interpretation
Upload a chest radiograph (DICOM, PNG or JPEG). The model places a box on each of its 29 anatomical
regions and scores every finding per region and for the whole image (zero-shot, against text prompts).
**Research use only: not for diagnosis.**"""


def region_colors() -> dict[str, str]:
  """Each region's colour in the boxes view: the same tab20 colours as the evaluation pictures."""
  return {name: colors.to_hex(pictures._region_color(r)) for r, name in enumerate(anatomy.REGION_NAMES)}


def box_view(result: Interpretation, max_pixels: int = BOX_VIEW_PIXELS):
  """(image, [(x1, y1, x2, y2), region]) for gr.AnnotatedImage, shrunk to `max_pixels` on the long side."""
  h, w = result.image.shape
  scale = min(1.0, max_pixels / max(h, w))
  image = Image.fromarray(result.image)
  if scale < 1.0:
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
  boxes = [(tuple(int(round(v * scale)) for v in xyxy), region) for region, xyxy in result.boxes.items()]
  return image.convert("RGB"), boxes


def region_table(result: Interpretation, top: int = TOP_FINDINGS) -> pd.DataFrame:
  """A row per region, most suspicious first: its `top` findings and their probabilities."""
  import pandas as pd

  top = min(top, len(result.image_findings))
  columns = ["region"] + [c for k in range(1, top + 1) for c in (f"finding {k}", f"p {k}")]
  rows = []
  for region, probs in result.region_findings.items():
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
    rows.append([region] + [v for finding, p in ranked for v in (finding, round(p, 3))])
  rows.sort(key=lambda row: -row[2])
  return pd.DataFrame(rows, columns=columns)


def figure_image(result: Interpretation) -> Image.Image:
  """The interpretation figure (regions filled by their top finding, image-level bars) as an image."""
  return Image.open(io.BytesIO(result.png())).convert("RGB")


def interpret_upload(interpreter: Interpreter, path: str | None):
  """The app's one event: an uploaded file's path -> (boxes view, figure, image-level findings,
  region table, caption). An unreadable file raises gr.Error, which the app shows as a message."""
  import gradio as gr

  if not path:
    raise gr.Error("Upload a radiograph first: a DICOM, PNG or JPEG file.")
  name = os.path.basename(path)
  try:
    result = interpreter.interpret(path, title=name)
  except ImageReadError as e:
    # The upload sits in gradio's cache folder: name the file as the user knows it.
    raise gr.Error(str(e).replace(path, name)) from None
  h, w = result.image.shape
  caption = f"**{name}**: {w} × {h} pixels"
  if not result.region_findings:
    caption += " (a holistic checkpoint: image-level findings only, no regions)"
  return box_view(result), figure_image(result), result.image_findings, region_table(result), caption


def build_demo(interpreter: Interpreter, *, title: str = "Anatomy-VLM") -> gr.Blocks:
  """The app for `interpreter` (from `interpret.load`). `.launch()` it: inline in a notebook, or
  `launch(server_name=..., server_port=..., share=...)` from a script. Telemetry is off."""
  import gradio as gr

  findings = list(interpreter.findings)
  with gr.Blocks(title=title, analytics_enabled=False) as demo:
    gr.Markdown(INTRO)
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Radiograph (DICOM, PNG or JPEG)", type="filepath")
        run = gr.Button("Interpret", variant="primary")
        caption = gr.Markdown()
        image_findings = gr.Label(label="Image-level findings", num_top_classes=len(findings))
      with gr.Column(scale=2):
        boxes = gr.AnnotatedImage(label="Anatomy boxes (hover a region's name to highlight it)",
                                  color_map=region_colors())
    figure = gr.Image(label="Regions filled by their top finding probability; image-level probabilities",
                      type="pil", interactive=False)
    regions = gr.Dataframe(label=f"Regions, most suspicious first: top {min(TOP_FINDINGS, len(findings))} findings",
                           interactive=False, wrap=True)
    gr.on([upload.upload, run.click], lambda path: interpret_upload(interpreter, path), inputs=upload,
          outputs=[boxes, figure, image_findings, regions, caption], api_name="interpret")
  return demo
