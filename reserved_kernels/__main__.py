"""``python -m reserved_kernels``."""

from reserved_kernels.cli import main

main()
