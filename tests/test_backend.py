"""Backend selection and forcing with RESERVED_KERNELS_BACKEND."""

from __future__ import annotations

import pytest
import torch

import reserved_kernels as rk
from reserved_kernels import _backend
from reserved_kernels.cli import info


def test_cpu_defaults_to_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend.select("gather", torch.device("cpu"), torch.float32) == "torch"


def test_forcing_an_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    emb = rk.ReservedEmbedding(10, 4, reserved_ids=[1])
    with pytest.raises(_backend.BackendUnavailableError, match="RESERVED_KERNELS_BACKEND=cuda is forced"):
        emb(torch.tensor([1, 2]))


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _backend.select("gather", torch.device("cpu"), torch.float32)


def test_unknown_backend_name_raises(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "numba")
    with pytest.raises(_backend.BackendUnavailableError, match="not a backend"):
        _backend.select("gather", torch.device("cpu"), torch.float32)


def test_float64_never_goes_to_kernels(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = _backend.availability("triton", torch.device("cpu"), torch.float64)
    assert not ok and "float64" in why


def test_forcing_torch_works(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    emb = rk.ReservedEmbedding(10, 4, reserved_ids=[1])
    assert emb(torch.tensor([1, 2])).shape == (2, 4)


def test_info_reports_every_backend():
    text = info()
    for backend in _backend.BACKENDS:
        assert f"cpu  {backend}" in text
    assert "cuda extension built:" in text
