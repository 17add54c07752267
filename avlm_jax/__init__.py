"""avlm_jax: Anatomy-VLM (anatomy-token ViT + text tower + multi-scale alignment) in JAX/Flax."""

__version__ = "0.1.0"
