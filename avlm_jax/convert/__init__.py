"""Pretrained-weight import and export.

`hf_bert`: Hugging Face BERT-family checkpoints -> `TextTower` params.
`vit`: plain ViT checkpoints (big_vision .npz, timm or HF safetensors) <-> `AnatomyViT` encoder params.
Every loader returns the params and a `report.ConversionReport` of what was loaded, skipped and kept.
"""
