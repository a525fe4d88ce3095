"""The disjoint-window pooling transpose (repeat) against torch's conv_transpose2d: the same values,
over kernels, strides and sizes that leave input rows no window covers (output padding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunecert.network import AvgPool2d


def _reference_pool(op: AvgPool2d, a: torch.Tensor) -> torch.Tensor:
    oph = op.in_shape[1] - ((op.out_shape[1] - 1) * op.stride[0] - 2 * op.padding[0] + op.kernel[0])
    opw = op.in_shape[2] - ((op.out_shape[2] - 1) * op.stride[1] - 2 * op.padding[1] + op.kernel[1])
    return F.conv_transpose2d(a, op._kernel.to(a.dtype), None, op.stride, op.padding, (oph, opw),
                              groups=op.in_shape[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw, kernel, stride, padding", [
    ((28, 28), 2, None, 0), ((7, 9), 2, None, 0), ((14, 13), (2, 3), None, 0), ((9, 9), 3, 2, 1), ((8, 8), 2, 1, 0)])
def test_pool_transpose_matches_conv_transpose2d(hw: tuple[int, int], kernel: int, stride: int | None, padding: int,
                                                 dtype: torch.dtype) -> None:
    """Disjoint windows (stride = kernel, no padding) in float64 take the repeat path; each entry is
    the one product conv_transpose2d computes, so the two agree bit for bit. Other pools and float32
    keep the conv."""
    op = AvgPool2d(kernel, (3, *hw), stride, padding)
    a = torch.randn(4, *op.out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = op.backward(a)
    assert got.shape == (4, *op.in_shape)
    assert torch.equal(got, _reference_pool(op, a))
