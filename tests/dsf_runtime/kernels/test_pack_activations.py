"""pack_activations: [T, cols] -> [ceil(T/BN), cols, BN], zero-padded."""

import pytest
import torch

from dsf_runtime.kernels.pack_activations import pack_activations, pack_activations_reference


@pytest.mark.parametrize("T,BN", [(1, 2), (5, 4), (16, 16)])
def test_matches_reference(device, T, BN):
    x = torch.randn(T, 300).half().to(device)
    assert torch.equal(pack_activations(x, BN).cpu(), pack_activations_reference(x.cpu(), BN))


def test_float32_output(device):
    x = torch.randn(3, 50).half().to(device)
    xp = pack_activations(x, 4, dtype=torch.float32)
    assert xp.dtype == torch.float32 and torch.equal(xp.cpu(), pack_activations_reference(x.cpu(), 4, dtype=torch.float32))


def test_errors():
    with pytest.raises(ValueError, match="BN must be a power of two"):
        pack_activations(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="unit column stride"):
        pack_activations(torch.zeros(3, 2).t(), 2)
