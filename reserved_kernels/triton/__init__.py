"""Triton backend: the kernels (``kernels.py``) and their host launchers (``launchers.py``, the ops' signatures)."""
