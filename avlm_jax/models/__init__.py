"""Flax linen models: anatomy-token ViT, BERT-style text tower, and the two-tower Anatomy-VLM."""
