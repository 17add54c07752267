"""Anatomy-VLM losses: detection (L1 + GIoU), region–phrase contrastive, image-level alignment."""
