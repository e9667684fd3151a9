import numpy as np
import pytest
import torch

from skelemix.augment import pretrain_augment, resize, shear, temporal_shift, to_view


def test_shear_matches_the_official_matrix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 10, 25, 2)
    out = shear(x, 0.5, g)
    draws = (torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.5
    for n in range(3):
        (a0, a1, a2), (b0, b1, b2) = draws[n].tolist()
        X, Y, Z = x[n]
        torch.testing.assert_close(out[n, 0], X + a0 * Y + b0 * Z)
        torch.testing.assert_close(out[n, 1], a1 * X + Y + b1 * Z)
        torch.testing.assert_close(out[n, 2], a2 * X + b2 * Y + Z)
    assert out.dtype == torch.float32
    assert torch.equal(shear(x, -1), x)


def test_temporal_shift_is_a_symmetric_pad_crop():
    T, ratio = 64, 6
    p = T // ratio
    x = torch.randn(400, 3, T, 4, 1)
    out = temporal_shift(x, ratio, torch.Generator().manual_seed(1))
    starts = torch.randint(0, 2 * p + 1, (400, 1), generator=torch.Generator().manual_seed(1)).flatten()
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (0, 0), (0, 0)), mode="symmetric")
    for n, s in enumerate(starts.tolist()):
        np.testing.assert_array_equal(out[n].numpy(), padded[n, :, s:s + T])
    assert set(starts.tolist()) >= {0, 2 * p}  # both extremes occur in 400 draws
    assert torch.equal(temporal_shift(x, -1), x)


def test_resize_is_cv2_linear_along_time():
    x = torch.randn(2, 3, 103, 25, 2)
    out = resize(x, 64)
    assert out.shape == (2, 3, 64, 25, 2)
    # cv2.INTER_LINEAR: source coordinate (i + 0.5) * T / T' - 0.5, clamped at the edges.
    src = np.clip((np.arange(64) + 0.5) * 103 / 64 - 0.5, 0, 102)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 102)
    w = src - lo
    xn = x.numpy()
    expected = xn[:, :, lo] * (1 - w)[None, None, :, None, None] + xn[:, :, hi] * w[None, None, :, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert resize(x, 103) is x


def test_views():
    x = torch.randn(2, 3, 8, 25, 2)
    assert to_view(x, "joint") is x
    motion = to_view(x, "motion")
    torch.testing.assert_close(motion[:, :, 3], x[:, :, 4] - x[:, :, 3])
    assert (motion[:, :, -1] == 0).all()
    bone = to_view(x, "bone")
    # 1-based pairs (v1, v2) from docs/DESIGN.md 1.6: (2, 21), (23, 8), (21, 21).
    torch.testing.assert_close(bone[:, :, :, 1], x[:, :, :, 1] - x[:, :, :, 20])
    torch.testing.assert_close(bone[:, :, :, 22], x[:, :, :, 22] - x[:, :, :, 7])
    assert (bone[:, :, :, 20] == 0).all()
    with pytest.raises(ValueError, match="view must be one of"):
        to_view(x, "velocity")


def test_pretrain_augment_keeps_shape_and_dtype_and_is_seeded():
    x = torch.randn(4, 3, 64, 25, 2)
    a = pretrain_augment(x, generator=torch.Generator().manual_seed(5))
    b = pretrain_augment(x, generator=torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.equal(a, b)
    assert pretrain_augment(x, frames=32).shape == (4, 3, 32, 25, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, T, V, M\)"):
        shear(torch.randn(3, 64, 25))
