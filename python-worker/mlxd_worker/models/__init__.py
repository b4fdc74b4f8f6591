"""Model files: the GGUF importer (``mlxd import``) and the GGUF header check."""
