"""ml_collections configs: `get_config(arg)` per file; shared defaults in `common.py`."""
