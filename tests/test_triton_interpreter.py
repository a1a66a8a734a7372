"""Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported, so ``scripts/test.sh``
runs this file in its own pytest process with the variable set; in the main process it is skipped.
"""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 before triton is imported: run in its own process "
                              "(scripts/test.sh does)"),
]

if os.environ.get("TRITON_INTERPRET") == "1":
    from reserved_kernels.triton import launchers
    from tests import kernel_cases as kc
    from tests.backend_suite import make_suite

    globals().update(make_suite(lambda: launchers, "cpu"))

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    def test_every_output_element_written(dtype, monkeypatch):
        kc.check_poisoned_outputs(launchers, monkeypatch, torch.device("cpu"), dtype)

    def test_module_end_to_end_through_triton(monkeypatch):
        """The module's forward and backward run on the forced Triton backend and match the reference."""
        import reserved_kernels as rk

        emb = rk.ReservedEmbedding(50, 19, reserved_ids=[4, 8, 15], scale=2.0)
        ids = torch.randint(0, 50, (6, 5))
        ids[0, :3] = torch.tensor([4, 8, 15])
        monkeypatch.setenv("RESERVED_KERNELS_BACKEND", "torch")
        ref = emb(ids)
        ref.square().sum().backward()
        ref_grad = emb.reserved_weight.grad.clone()
        emb.reserved_weight.grad = None
        monkeypatch.setenv("RESERVED_KERNELS_BACKEND", "triton")
        out = emb(ids)
        out.square().sum().backward()
        assert torch.equal(out, ref)
        torch.testing.assert_close(emb.reserved_weight.grad, ref_grad, rtol=1e-6, atol=1e-6)
