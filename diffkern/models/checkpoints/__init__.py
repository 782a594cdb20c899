"""Foreign checkpoint formats, one file per format, each mapping keys to the diffusers layout."""
