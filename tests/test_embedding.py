"""ReservedEmbedding as a drop-in nn.Embedding: oracle, state dict, export, init, optimizer, autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reserved_kernels as rk
from tests.oracle import embedding_oracle, merged_table

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _module(dtype=torch.float32, vocab=101, dim=23, reserved=(7, 8, 50, 99), seed=0, **kw):
    torch.manual_seed(seed)
    emb = rk.ReservedEmbedding(vocab, dim, reserved_ids=list(reserved), dtype=dtype, **kw)
    with torch.no_grad():  # reserved rows differ from their base rows, as after training
        emb.reserved_weight.add_(torch.randn_like(emb.reserved_weight))
    return emb


def test_is_an_nn_embedding():
    emb = _module(padding_idx=0)
    assert isinstance(emb, nn.Embedding)
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (101, 23, 0)
    assert not emb.weight.requires_grad and emb.reserved_weight.requires_grad
    assert [n for n, p in emb.named_parameters() if p.requires_grad] == ["reserved_weight"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(0,), (17,), (3, 5, 7)], ids=str)
def test_forward_and_gradient_match_oracle(dtype, id_dtype, shape):
    emb = _module(dtype, scale=23 ** 0.5, padding_idx=3)
    assert emb.reserved_weight.dtype == (torch.float32 if dtype != torch.float32 else dtype)  # master rows
    ids = torch.randint(0, 101, shape, dtype=id_dtype)
    if ids.numel() > 5:
        ids.view(-1)[:5] = torch.tensor([7, 7, 99, 3, 50])  # repeated reserved ids and the padding id
    grad = torch.randn(*shape, 23, dtype=dtype)
    out = emb(ids)
    out.backward(grad)
    rw = emb.reserved_weight.detach().clone().requires_grad_(True)
    expected = embedding_oracle(ids, merged_table(emb.weight, emb.reserved_ids, rw.to(dtype)), 23 ** 0.5)
    expected.backward(grad)
    assert out.dtype == dtype and torch.equal(out, expected)  # forward: bit-exact
    # fp32 accumulation vs the oracle's own low-precision path: twice the oracle's error budget.
    tol = 2 * torch.finfo(dtype).eps * max(1.0, rw.grad.abs().max().item()) * max(1, ids.numel()) ** 0.5
    torch.testing.assert_close(emb.reserved_weight.grad, rw.grad, rtol=0, atol=tol)
    assert emb.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_master_rows_learn_at_a_small_learning_rate(dtype):
    """AdamW at lr=1e-5 moves rows of magnitude ~1 by 1e-5 a step: below bf16's resolution (2**-8).

    With float32 master rows (the default) the rows move; with rows kept in the table dtype the
    update is rounded away at every step and nothing trains.
    """
    def train(reserved_dtype):
        torch.manual_seed(0)
        table = torch.randn(50, 16).to(dtype)
        emb = rk.ReservedEmbedding.from_embedding(table, [3, 4], reserved_dtype=reserved_dtype)
        start = emb.reserved_weight.detach().clone()
        opt = torch.optim.AdamW([emb.reserved_weight], lr=1e-5, weight_decay=0.0)
        for _ in range(5):
            opt.zero_grad()
            emb(torch.tensor([3, 4, 3])).float().sum().backward()
            opt.step()
        return (emb.reserved_weight.detach().float() - start.float()).abs().max().item()

    moved = train(None)
    assert 4e-5 < moved < 6e-5  # five steps of 1e-5 each (Adam's update has magnitude lr)
    assert train(dtype) == 0.0


def test_no_reserved_ids_behaves_like_a_frozen_nn_embedding():
    torch.manual_seed(0)
    plain = nn.Embedding(30, 6, padding_idx=2)
    expected = plain(torch.arange(30)).detach()
    emb = rk.ReservedEmbedding.from_embedding(plain, [])
    ids = torch.randint(0, 30, (4, 9))
    ids[0, 0] = 2
    out = emb(ids)
    assert torch.equal(out, expected[ids])
    out.sum().backward()
    assert emb.reserved_weight.grad.shape == (0, 6) and emb.weight.grad is None


def test_from_embedding_adopts_the_parameter_and_carries_padding():
    plain = nn.Embedding(40, 8, padding_idx=1)
    emb = rk.ReservedEmbedding.from_embedding(plain, [5, 6], scale=2.0)
    assert emb.weight is plain.weight and not plain.weight.requires_grad  # one Parameter, frozen for every holder
    assert emb.padding_idx == 1 and emb.scale == 2.0
    torch.testing.assert_close(emb.reserved_weight.detach(), plain.weight.detach()[[5, 6]])
    emb2 = rk.ReservedEmbedding.from_embedding(plain.weight.detach(), [5])
    assert emb2.weight.data_ptr() == plain.weight.data_ptr()


def test_int8_table_with_row_scales_and_requantising_merge():
    torch.manual_seed(0)
    weight = torch.randint(-128, 128, (50, 12), dtype=torch.int8)
    scaler = (torch.rand(50) + 0.1).to(torch.bfloat16)
    emb = rk.ReservedEmbedding.from_embedding(weight, [3, 4], weight_scaler=scaler, scale=12 ** 0.5)
    assert emb.reserved_weight.dtype == torch.float32 and emb(torch.tensor([1])).dtype == torch.bfloat16
    ids = torch.randint(0, 50, (6, 7))
    dense = (weight * scaler.unsqueeze(-1)).index_copy(0, torch.tensor([3, 4]), emb.reserved_weight.detach().bfloat16())
    expected = torch.nn.functional.embedding(ids, dense) * torch.tensor(12 ** 0.5, dtype=torch.bfloat16)
    assert torch.equal(emb(ids), expected)
    assert torch.equal(emb.merged_weight(), dense)
    with torch.no_grad():
        emb.reserved_weight.add_(torch.randn(2, 12) * 3)  # trained rows, far from the old quantisation grid
    trained = emb.reserved_weight.detach().clone()
    others = weight.clone()
    emb.merge_()
    step = emb.weight_scaler[[3, 4]].float().unsqueeze(-1)
    requantised = emb.weight[[3, 4]].float() * step
    assert ((requantised - trained).abs() <= step / 2).all()  # within half a quantisation step
    keep = torch.ones(50, dtype=torch.bool)
    keep[[3, 4]] = False
    assert torch.equal(emb.weight[keep], others[keep]) and torch.equal(emb.weight_scaler[keep], scaler[keep])


def test_state_dict_round_trip_and_plain_embedding_state_dict():
    emb = _module(scale=2.0)
    table = emb.weight.detach().clone()
    state = emb.state_dict()
    assert set(state) == {"weight", "reserved_weight", "reserved_ids"}
    # "weight" is the table as the forward pass sees it: a plain nn.Embedding loads it and agrees.
    assert torch.equal(state["weight"], emb.merged_weight())
    assert torch.equal(emb.weight, table)  # saving wrote nothing into the frozen table
    ids = torch.randint(0, 101, (5, 6))
    ids[0, :4] = torch.tensor([7, 8, 50, 99])
    plain = nn.Embedding(101, 23)
    plain.load_state_dict({"weight": state["weight"]})
    assert torch.equal(plain(ids) * torch.tensor(2.0), emb(ids))

    other = rk.ReservedEmbedding(101, 23, reserved_ids=[1, 2, 3, 4], scale=2.0)
    other.load_state_dict(state)
    assert torch.equal(other(ids), emb(ids))
    assert other.reserved_ids.tolist() == [7, 8, 50, 99]
    assert torch.equal(other.reserved_weight, emb.reserved_weight)  # master rows, exactly

    fresh = rk.ReservedEmbedding(101, 23, reserved_ids=[7, 8])
    fresh.load_state_dict(plain.state_dict())  # only "weight": reserved rows start from it
    assert torch.equal(fresh.reserved_weight.detach(), plain.weight.detach()[[7, 8]])


def test_loading_a_merged_state_dict_leaves_the_shared_table_rows_alone():
    """A checkpoint's merged rows go to reserved_weight, never into the frozen (possibly shared) storage."""
    emb = _module()
    before = emb.weight.detach().clone()
    emb.load_state_dict(emb.state_dict())
    assert torch.equal(emb.weight, before)


def test_state_dict_with_wrong_reserved_count_is_refused():
    emb = _module()
    other = rk.ReservedEmbedding(101, 23, reserved_ids=[1, 2])
    with pytest.raises(ValueError, match="4 reserved ids, this module 2"):
        other.load_state_dict(emb.state_dict())


def test_merge_and_to_embedding_reproduce_the_forward():
    emb = _module(scale=1.0)
    ids = torch.randint(0, 101, (4, 8))
    ids[0, :4] = torch.tensor([7, 8, 50, 99])
    out = emb(ids)
    plain = emb.to_embedding()
    assert type(plain) is nn.Embedding and torch.equal(plain(ids), out)
    before = emb.weight.clone()
    emb.merge_()
    assert torch.equal(emb.weight[[7, 8, 50, 99]], emb.reserved_weight.detach())
    untouched = torch.ones(101, dtype=torch.bool)
    untouched[[7, 8, 50, 99]] = False
    assert torch.equal(emb.weight[untouched], before[untouched])
    assert torch.equal(emb(ids), out)


def test_init_reserved_mean_of_sources_reads_before_writing():
    emb = _module(reserved=(7, 8))
    merged = emb.merged_weight()
    # Row 8's sources include reserved row 7, whose new value must not be seen.
    emb.init_reserved_([[1, 2, 3], [7, 10]])
    torch.testing.assert_close(emb.reserved_weight[0].detach(), merged[[1, 2, 3]].mean(0))
    torch.testing.assert_close(emb.reserved_weight[1].detach(), merged[[7, 10]].mean(0))


def test_init_reserved_targets_exclude_noise_and_generator():
    emb = _module(reserved=(7, 8, 50))
    base = emb.merged_weight()
    g1 = torch.Generator().manual_seed(3)
    emb.init_reserved_([[1, 7, 2]], targets=[50], exclude=[7], noise_std=0.1, generator=g1)
    first = emb.reserved_weight.detach().clone()
    emb.init_reserved_([[1, 7, 2]], targets=[50], exclude=[7], noise_std=0.1,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, emb.reserved_weight.detach())  # reproducible with the generator
    assert torch.equal(first[:2], base[[7, 8]])  # other targets untouched
    noise = first[2] - base[[1, 2]].mean(0)
    assert 0.02 < noise.std().item() < 0.5


def test_init_reserved_bad_input_changes_nothing():
    emb = _module(reserved=(7, 8))
    before = emb.reserved_weight.detach().clone()
    with pytest.raises(ValueError, match="destinations \\[1\\] have none"):
        emb.init_reserved_([[1, 2], []])
    with pytest.raises(ValueError, match="after excluding"):
        emb.init_reserved_([[1, 2], [7]], exclude=[7])
    with pytest.raises(ValueError, match="targets must be reserved"):
        emb.init_reserved_([[1]], targets=[9])
    with pytest.raises(ValueError, match="2 targets but 3 source lists"):
        emb.init_reserved_([[1], [2], [3]])
    with pytest.raises(IndexError, match="src_ids"):
        emb.init_reserved_([[1], [1000]])
    with pytest.raises(TypeError, match="integers"):
        emb.init_reserved_([[1.5], [2.0]])
    with pytest.raises(ValueError, match="noise_std"):
        emb.init_reserved_([[1], [2]], noise_std=-0.1)
    with pytest.raises(ValueError, match="noise_std"):
        rk.mean_init_(emb.weight.detach().clone(), [3], [[4]], noise_std=float("nan"))
    assert torch.equal(before, emb.reserved_weight.detach())


def test_one_source_list_is_shared_by_every_target_with_its_own_noise():
    emb = _module(reserved=(7, 8, 50))
    base = emb.merged_weight()
    emb.init_reserved_([[1, 2, 3, 4]])
    assert torch.equal(emb.reserved_weight[0], emb.reserved_weight[2])
    torch.testing.assert_close(emb.reserved_weight[1].detach(), base[[1, 2, 3, 4]].mean(0))
    emb.init_reserved_([[1, 2, 3, 4]], noise_std=0.1, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(emb.reserved_weight[0], emb.reserved_weight[2])


def test_mean_init_on_a_plain_table_is_order_independent():
    torch.manual_seed(0)
    table = torch.randn(20, 5)
    original = table.clone()
    rk.mean_init_(table, [3, 4], [[4, 5], [3, 6]])  # each destination is the other's source
    torch.testing.assert_close(table[3], original[[4, 5]].mean(0))
    torch.testing.assert_close(table[4], original[[3, 6]].mean(0))
    offsets, ids = torch.tensor([0, 2, 4]), torch.tensor([4, 5, 3, 6])
    again = original.clone()
    rk.mean_init_(again, [3, 4], (offsets, ids))
    assert torch.equal(again, table)


def test_adamw_with_weight_decay_leaves_frozen_rows_bit_identical():
    emb = _module(scale=4.0)
    frozen = emb.weight.detach().clone()
    start = emb.reserved_weight.detach().clone()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(5):
        ids = torch.randint(0, 101, (8, 16))
        ids[:, 0] = 7
        opt.zero_grad()
        emb(ids).pow(2).mean().backward()
        opt.step()
    assert torch.equal(emb.weight, frozen)
    assert not torch.equal(emb.reserved_weight.detach(), start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_keeps_the_table_dtype(dtype):
    emb = _module(dtype)
    ids = torch.randint(0, 101, (3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(ids)
        loss = (out.float() @ torch.randn(23, 2)).sum()
    loss.backward()
    assert out.dtype == dtype == nn.Embedding(2, 2, dtype=dtype).weight.dtype
    assert emb.reserved_weight.grad is not None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_norm=1.0), NotImplementedError, "max_norm"),
    (dict(sparse=True), NotImplementedError, "sparse=True"),
    (dict(scale_grad_by_freq=True), NotImplementedError, "scale_grad_by_freq"),
])
def test_unsupported_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        rk.ReservedEmbedding(10, 4, reserved_ids=[1], **kwargs)


@pytest.mark.parametrize("reserved, error, match", [
    ([1, 1], ValueError, "distinct"),
    ([10], IndexError, r"\[0, 10\)"),
    ([-1], IndexError, r"\[0, 10\)"),
    ([1.0], TypeError, "integers"),
    ([0], ValueError, "padding_idx"),
])
def test_bad_reserved_ids_raise(reserved, error, match):
    with pytest.raises(error, match=match):
        rk.ReservedEmbedding(10, 4, padding_idx=0, reserved_ids=reserved)


def test_bad_forward_ids_raise_and_change_nothing():
    emb = _module()
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 101\), got 101"):
        emb(torch.tensor([0, 101]))
    with pytest.raises(TypeError, match="int32 or int64"):
        emb(torch.tensor([0.0]))
