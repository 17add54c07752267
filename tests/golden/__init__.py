"""Reference outputs from third-party implementations, and the scripts that regenerate them."""
