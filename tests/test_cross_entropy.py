"""The fused linear cross-entropy: the functional API, the head's loss, the op's registration, and what it never builds.

The per-backend numerics (every dtype, soft-cap, odd sizes, tile edges, reserved targets) are in
``kernel_cases.check_linear_cross_entropy``, run by every backend's suite; the model integrations are in
``test_gemma.py``, ``test_families.py``, ``test_workflows.py`` and ``test_gemma_pytorch.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import reserved_kernels as rk
from reserved_kernels import ops

EPS32 = torch.finfo(torch.float32).eps


def _head(vocab=301, dim=16, reserved=(7, 8, 200), tied=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    emb = rk.ReservedEmbedding(vocab, dim, reserved_ids=list(reserved), dtype=dtype)
    with torch.no_grad():
        emb.weight.mul_(3 / dim ** 0.5)
        emb.reserved_weight.copy_(torch.randn(len(reserved), dim) * 3 / dim ** 0.5)
    if tied:
        return emb, rk.ReservedLMHead.tied_to(emb)
    linear = torch.nn.Linear(dim, vocab, bias=False, dtype=dtype)
    return emb, rk.ReservedLMHead.from_linear(linear, list(reserved))


def _batch(vocab=301, shape=(3, 11), seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, 16, generator=gen).requires_grad_(True)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets[0, :3] = torch.tensor([7, 8, 200])  # reserved targets
    targets[1, 4] = -100
    return hidden, targets


def _fused_and_unfused(head, hidden, targets, **kwargs):
    """(fused loss, its grads), (the head's logits then F.cross_entropy, its grads) for the same call."""
    rows = head.reserved_weight
    results = []
    for fused in (True, False):
        hidden.grad, rows.grad = None, None
        if fused:
            loss = head(hidden, targets, **kwargs)
        else:
            logits = head(hidden)
            if kwargs.get("softcap") is not None:
                logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
            reduction = "sum" if "num_items_in_batch" in kwargs else kwargs.get("reduction", "mean")
            loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction=reduction,
                                   ignore_index=kwargs.get("ignore_index", -100))
            if "num_items_in_batch" in kwargs:
                loss = loss / kwargs["num_items_in_batch"]
            loss = loss.view(targets.shape) if reduction == "none" else loss
        (loss.sum() if loss.dim() else loss).backward()
        results.append((loss.detach(), hidden.grad.clone(), rows.grad.clone()))
    return results


def _assert_same_loss(fused, unfused, vocab=301, dim=16):
    """Two fp32 evaluations of one loss that sum in different orders: a sum of n terms in any order is within
    n·eps·Σ|terms| of the exact one, n = V + D at most here (V columns, D products per logit)."""
    tol = (vocab + dim) * EPS32
    for ours, theirs in zip(fused, unfused, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_heads_loss_is_the_cross_entropy_of_its_logits(reduction, tied):
    _, head = _head(tied=tied)
    hidden, targets = _batch()
    fused, unfused = _fused_and_unfused(head, hidden, targets, reduction=reduction)
    _assert_same_loss(fused, unfused)
    assert head.weight.grad is None  # the frozen table gets nothing


@pytest.mark.parametrize("num_items", [7, torch.tensor(7)], ids=["int", "tensor"])
def test_num_items_in_batch_divides_the_sum(num_items):
    _, head = _head()
    hidden, targets = _batch()
    fused, unfused = _fused_and_unfused(head, hidden, targets, num_items_in_batch=num_items)
    _assert_same_loss(fused, unfused)


def test_softcap_and_another_ignore_index():
    _, head = _head()
    hidden, targets = _batch()
    targets[targets == -100] = -1
    targets[2, :5] = -1
    fused, unfused = _fused_and_unfused(head, hidden, targets, softcap=5.0, ignore_index=-1)
    _assert_same_loss(fused, unfused)


def test_every_token_on_one_reserved_id():
    _, head = _head()
    hidden, _ = _batch()
    targets = torch.full((3, 11), 8)
    fused, unfused = _fused_and_unfused(head, hidden, targets)
    _assert_same_loss(fused, unfused)
    assert fused[2][[0, 2]].abs().max() > 0  # the other reserved rows still get the softmax's share


def test_every_token_ignored_gives_what_the_unfused_path_gives():
    """A mean over no token: NaN, as F.cross_entropy gives, and zero gradients (not NaN), as it gives."""
    _, head = _head()
    hidden, targets = _batch()
    targets.fill_(-100)
    (loss, grad_h, grad_r), (ref, ref_h, ref_r) = _fused_and_unfused(head, hidden, targets)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert torch.equal(grad_h, ref_h) and torch.equal(grad_r, ref_r) and not grad_h.abs().sum()
    fused, unfused = _fused_and_unfused(head, hidden, targets, reduction="sum")
    assert fused[0] == 0 and unfused[0] == 0


def test_fp32_master_rows_of_a_bf16_table_get_fp32_gradients():
    emb, head = _head(dtype=torch.bfloat16)
    assert emb.reserved_weight.dtype == torch.float32
    hidden, targets = _batch()
    head(hidden.bfloat16(), targets).backward()
    assert emb.reserved_weight.grad.dtype == torch.float32 and emb.reserved_weight.grad.abs().sum() > 0


def test_autocast_hidden_states_are_taken_at_the_tables_precision():
    _, head = _head()
    hidden, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(hidden, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def test_stats_entropy_and_top1():
    _, head = _head()
    hidden, targets = _batch()
    with torch.no_grad():
        logits = head(hidden).double()
        stats = head(hidden, targets, reduction="none", return_stats=True)
    logp = logits.log_softmax(-1)
    valid = targets != -100
    entropy = torch.where(valid, -(logp.exp() * logp).sum(-1), 0)
    torch.testing.assert_close(stats.entropy.double(), entropy, rtol=317 * EPS32, atol=317 * EPS32 * 10)
    assert torch.equal(stats.is_top1, valid & (logits.argmax(-1) == targets))


def test_gradcheck_float64():
    emb, head = _head(vocab=41, dim=5, reserved=(3, 4), dtype=torch.float64)
    hidden = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 41, (2, 6))
    targets[0, 0], targets[1, 1], targets[1, 2] = 3, 4, -100
    rows = emb.reserved_weight.detach().clone().requires_grad_(True)

    def f(hidden, rows):
        return rk.linear_cross_entropy(hidden, emb.weight, rows, emb.slot_map, targets, softcap=2.0,
                                       reduction="none", tile_bytes=8 * 16 * 2)

    assert torch.autograd.gradcheck(f, (hidden, rows))


def test_opcheck():
    emb, _ = _head()
    hidden = torch.randn(9, 16, requires_grad=True)
    rows = emb.reserved_weight.detach().clone().requires_grad_(True)
    targets = torch.randint(0, 301, (9,))
    targets[0], targets[1] = 7, -100
    for stats in (False, True):
        torch.library.opcheck(ops.linear_cross_entropy, (hidden, emb.weight, rows, emb.slot_map, targets, -100, 4.0,
                                                         4096, True, True, stats))
    # Only the rows' gradient (a frozen position's hidden state needs none), only hidden's, neither.
    for grad_hidden, grad_rows in ((False, True), (True, False), (False, False)):
        torch.library.opcheck(ops.linear_cross_entropy, (hidden.detach().requires_grad_(grad_hidden), emb.weight,
                                                         rows.detach().requires_grad_(grad_rows), emb.slot_map, targets,
                                                         -100, 4.0, 4096, grad_hidden, grad_rows, False))


def test_compiled_fullgraph_matches_eager():
    _, head = _head()
    hidden, targets = _batch()
    eager = _fused_and_unfused(head, hidden, targets)[0]
    compiled = torch.compile(lambda h, t: head(h, t), fullgraph=True)
    hidden.grad, head.reserved_weight.grad = None, None
    loss = compiled(hidden, targets)
    loss.backward()
    # The op runs as it does eagerly; inductor may reorder the mean's sum over the N = 33 tokens (and divide by
    # the count as a multiply by its reciprocal): within (N + 2)·eps of each other.
    tol = (targets.numel() + 2) * EPS32
    for ours, theirs in zip((loss, hidden.grad, head.reserved_weight.grad), eager, strict=True):
        torch.testing.assert_close(ours.detach(), theirs, rtol=tol, atol=tol * theirs.abs().max().item())


class _LargestOutput(TorchDispatchMode):
    """Records the most elements any op's output had while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_n_by_v_elements_exists_in_the_forward_or_the_backward():
    vocab, tokens = 4099, 192
    emb, head = _head(vocab=vocab)
    hidden = torch.randn(tokens, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with _LargestOutput() as seen:
        head(hidden, targets, tile_bytes=64 * 256 * 4).backward()
    assert seen.largest <= vocab * 16 + tokens  # the table's own size (a view of it), never tokens x vocab
    assert seen.largest < tokens * vocab // 10
    assert emb.reserved_weight.grad.shape == (3, 16)


def test_bad_input_is_a_clear_error_and_changes_nothing():
    emb, head = _head()
    hidden, targets = _batch()
    before = emb.reserved_weight.detach().clone()
    bad = targets.clone()
    bad[1, 1] = 301
    with pytest.raises(IndexError, match=r"targets must lie in \[0, 301\) or be ignore_index=-100, got 301"):
        head(hidden, bad)
    with pytest.raises(ValueError, match="targets must have hidden's leading shape"):
        head(hidden, targets[:, :5])
    with pytest.raises(ValueError, match="reduction must be one of"):
        head(hidden, targets, reduction="avg")
    with pytest.raises(ValueError, match="softcap must be > 0"):
        head(hidden, targets, softcap=-1.0)
    with pytest.raises(ValueError, match="must have the table's dtype and width"):
        rk.linear_cross_entropy(torch.randn(4, 15), emb.weight, emb.reserved_weight, emb.slot_map,
                                torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be an int32 or int64 tensor"):
        rk.linear_cross_entropy(torch.randn(4, 16), emb.weight, emb.reserved_weight, emb.slot_map, torch.zeros(4))
    trainable = emb.weight.detach().clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="only the K reserved rows"):
        rk.linear_cross_entropy(hidden, trainable, emb.reserved_weight, emb.slot_map, targets)
    assert torch.equal(emb.reserved_weight, before) and emb.reserved_weight.grad is None and hidden.grad is None


def test_a_head_softcap_and_another_softcap_argument_conflict():
    emb, _ = _head()
    head = rk.ReservedLMHead.tied_to(emb, final_logit_softcapping=30.0)
    hidden, targets = _batch()
    with pytest.raises(ValueError, match="differs from this head's final_logit_softcapping"):
        head(hidden, targets, softcap=20.0)
    fused, unfused = _fused_and_unfused(head, hidden, targets)  # the head's own cap, on both paths
    _assert_same_loss(fused, unfused)


def test_forcing_the_compiled_backend_names_the_backends_that_run_the_loss():
    _, head = _head()
    hidden, targets = _batch()
    with ops.forced("compiled"):
        with pytest.raises(rk._backend.BackendUnavailableError, match="runs on 'torch' or 'triton'"):
            head(hidden, targets)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_a_detached_hidden_costs_no_accumulator_and_gives_the_rows_the_same_gradient(softcap, monkeypatch):
    """Frozen positions: hidden needs no gradient, so the loss runs one GEMM per tile (no accumulator GEMM, no
    (N, D) gradient buffer) and the rows' gradient is what the full computation gives them, bit for bit (the
    same K-column formula from the same statistics)."""
    from reserved_kernels.ops import fused_loss

    _, head = _head()
    hidden, targets = _batch()
    rows = head.reserved_weight
    full = head(hidden, targets, softcap=softcap)
    full.backward()
    expected = rows.grad.clone()
    rows.grad = None
    calls = []
    accumulate = fused_loss.TileGemms.accumulate
    monkeypatch.setattr(fused_loss.TileGemms, "accumulate", lambda *a: (calls.append(1), accumulate(*a))[1])
    seen = []
    original = ops.linear_cross_entropy

    def spy(*args):
        out = original(*args)
        seen.append(out[3].shape)
        return out

    monkeypatch.setattr(ops, "linear_cross_entropy", spy)
    frozen = head(hidden.detach(), targets, softcap=softcap)
    frozen.backward()
    assert torch.equal(frozen, full.detach()) and torch.equal(rows.grad, expected)
    assert calls == [] and seen == [torch.Size([0, 16])]  # no accumulator GEMM, no grad_hidden buffer
    calls.clear()
    head(hidden, targets, softcap=softcap)  # hidden needs a gradient again: the accumulator is back
    assert calls
