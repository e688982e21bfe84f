"""Hardware profiles of the example plugin: every YAML in this folder is a ``hw=<file name>``
choice (the ``moesim.hw_profiles`` entry point names this package)."""
