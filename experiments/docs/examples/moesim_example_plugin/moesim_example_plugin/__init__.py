"""An example moesim plugin: the ``my_random`` eviction policy (see ``policies.py``)."""
