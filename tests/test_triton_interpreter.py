"""Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported, so ``scripts/test.sh``
runs this file in its own pytest process with the variable set; in the main process it is skipped.
"""

import dataclasses
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
    import reserved_kernels as rk
    from reserved_kernels import ops
    from reserved_kernels.triton import launchers
    from tests import kernel_cases as kc
    from tests.backend_suite import make_suite

    globals().update(make_suite("triton", "cpu"))

    @pytest.mark.parametrize("dtype", kc.DTYPES, ids=str)
    def test_every_output_element_written(dtype, monkeypatch):
        """Outputs allocated with NaN instead of garbage: any element a kernel fails to write shows up."""

        class PoisonTorch:
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def empty(*args, **kwargs):
                out = torch.empty(*args, **kwargs)
                return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-(2**30))

        monkeypatch.setattr(launchers, "torch", PoisonTorch())
        device = torch.device("cpu")
        with ops.forced("triton"):
            kc.check_gather(device, dtype, 37, 5, (6, 7), master=True)
            kc.check_scatter(device, dtype, 37, 5, (6, 7))  # also rows no token hit: written as zeros
            kc.check_skewed_scatter(device, dtype, "one-hot-row")
            kc.check_segment_mean(device, dtype, 37)

    def test_backward_crossing_many_chunks_matches_the_reference():
        """Long runs of one slot cross chunk boundaries: their pieces are added in chunk order."""
        c = kc.make_case(device="cpu", dtype=torch.float32, dim=19, num_reserved=4, shape=(3000,))
        ids = c["ids"].clone()
        ids[100:2500] = c["reserved_ids"][2]  # one run over ~19 chunks of 128
        ids[2500:2600] = c["reserved_ids"][0]
        grad = torch.randn(3000, 19, generator=torch.Generator().manual_seed(3))
        with ops.forced("triton"):
            got = ops.scatter_grad(grad, ids, c["slot_map"], 4, 1.0, torch.float32)
        exact, bound = kc.scatter_oracle(grad, ids, c["reserved_ids"], 1.0)
        kc.assert_within(got, exact, bound)

    def test_bad_ids_fail_the_device_assertion(monkeypatch):
        """The kernels assert on the device (debug=True); the interpreter honours asserts only in debug mode."""
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.interpreter_builder, "options",
                            dataclasses.replace(interpreter.interpreter_builder.options, debug=True))
        with ops.forced("triton"):
            kc.check_bad_ids_raise(torch.device("cpu"), torch.float32, error=Exception, names_value=False)

    def test_module_end_to_end_through_triton():
        """The module's forward and backward run on the forced Triton backend and match the reference."""
        emb = rk.ReservedEmbedding(50, 19, reserved_ids=[4, 8, 15], scale=2.0)
        ids = torch.randint(0, 50, (6, 5))
        ids[0, :3] = torch.tensor([4, 8, 15])
        with ops.forced("torch"):
            ref = emb(ids)
            ref.square().sum().backward()
        ref_grad = emb.reserved_weight.grad.clone()
        emb.reserved_weight.grad = None
        with ops.forced("triton"):
            out = emb(ids)
            out.square().sum().backward()
        assert torch.equal(out, ref)
        torch.testing.assert_close(emb.reserved_weight.grad, ref_grad, rtol=1e-6, atol=1e-6)
