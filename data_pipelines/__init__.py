"""Data: the triple record schema, offline corpus builders, and the Grain input pipeline."""
