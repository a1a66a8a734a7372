"""The pure-PyTorch reference and the compiled CPU kernels against the independent oracle, on CPU."""

import pytest

from reserved_kernels import _backend, ops
from tests import kernel_cases as kc
from tests.backend_suite import make_suite

_compiled, _why = _backend.availability("compiled", "cpu")
globals().update({f"{name}_reference": fn for name, fn in make_suite("torch", "cpu").items()})
globals().update({f"{name}_compiled": fn for name, fn in
                  make_suite("compiled", "cpu", skip_reason=None if _compiled else _why).items()})


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_bad_ids_raise_index_error_naming_the_value(backend):
    ok, why = _backend.availability(backend, "cpu")
    if not ok:
        pytest.skip(why)
    import torch

    with ops.forced(backend):
        kc.check_bad_ids_raise(torch.device("cpu"), torch.float32)
