"""The pure-PyTorch reference against the independent oracle, on CPU."""

from reserved_kernels import reference
from tests.backend_suite import make_suite

globals().update(make_suite(lambda: reference, "cpu"))
