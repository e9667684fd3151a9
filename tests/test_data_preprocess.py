"""The fixed-length preprocessing (docs/DESIGN.md 1.3) against values computed by hand, fixed and official."""
import numpy as np
import pytest
import torch

from skelemix.augment import resize
from skelemix.data.preprocess import align_shoulders, has_body, preprocess, resize_time, valid_window

S = np.sqrt(0.5)


def test_linear_resize_by_hand():
    # 2 -> 4 frames: source positions -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    x = np.array([1.0, 5.0]).reshape(1, 2)
    np.testing.assert_allclose(resize_time(x, 4)[0], [1, 2, 4, 5])
    # 4 -> 2 frames: positions 0.5 and 2.5.
    np.testing.assert_allclose(resize_time(np.array([[0.0, 2, 4, 8]]), 2)[0], [1, 6])
    x = np.arange(6.0).reshape(1, 6)
    np.testing.assert_array_equal(resize_time(x, 6), x)


@pytest.mark.parametrize("T", [103, 30, 64, 1])
def test_resize_matches_interpolate_and_the_batched_op(T):
    x = np.random.default_rng(T).normal(size=(3, T, 25, 2)).astype(np.float32)
    ours = resize_time(x, 64)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 2, 3, 1).reshape(1, -1, T), size=64,
                                          mode="linear", align_corners=False).reshape(3, 25, 2, 64).permute(0, 3, 1, 2)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, resize(torch.from_numpy(x)[None], 64)[0].numpy(), rtol=1e-5, atol=1e-6)


def _shoulders(vs):
    """(3, T, 25, 1) with joint 8 - joint 4 = vs[t] and a marker joint 3 at (0, 0, 1)."""
    x = np.zeros((3, len(vs), 25, 1))
    x[:, :, 8, 0] = np.array(vs).T
    x[:, :, 3, 0] = np.array([0, 0, 1])[:, None]
    return x


def test_rotation_fixed_puts_every_shoulder_vector_on_x():
    out = align_shoulders(_shoulders([(1, 0.3, 1), (1, 0, -0.5), (0, 0, 1)]))
    np.testing.assert_allclose(out[:, :, 8, 0].T, [[np.sqrt(2), 0.3, 0], [np.sqrt(1.25), 0, 0], [1, 0, 0]],
                               atol=1e-12)
    # The marker (0, 0, 1) turns with the frame: by -45 deg, +26.57 deg, -90 deg about y.
    np.testing.assert_allclose(out[:, :, 3, 0].T, [[S, 0, S], [-1 / np.sqrt(5), 0, 2 / np.sqrt(5)], [1, 0, 0]],
                               atol=1e-12)
    zero = np.zeros((3, 4, 25, 1))
    np.testing.assert_array_equal(align_shoulders(zero), zero)  # an absent body stays 0


def test_rotation_official_quirks():
    out = align_shoulders(_shoulders([(1, 0, 1), (1, 0, -0.5)]), official=True)
    # Sum of z = 0.5 >= 0: both angles are -arccos(v.x / (|v| + 1e-4)).
    t1 = -np.arccos(1 / (np.sqrt(2) + 1e-4))
    t2 = -np.arccos(1 / (np.sqrt(1.25) + 1e-4))
    np.testing.assert_allclose(out[:, 0, 8, 0], [np.cos(t1) - np.sin(t1), 0, np.sin(t1) + np.cos(t1)], atol=1e-12)
    np.testing.assert_allclose(out[:, 1, 8, 0], [np.cos(t2) + 0.5 * np.sin(t2), 0, np.sin(t2) - 0.5 * np.cos(t2)],
                               atol=1e-12)
    assert 1e-5 < abs(out[2, 0, 8, 0]) < 1e-3  # the epsilon's residual z
    # The second frame's z disagrees with the summed sign: it is turned the wrong way.
    assert out[2, 1, 8, 0] == pytest.approx(-np.sin(2 * np.arctan(0.5)) * np.sqrt(1.25), abs=1e-3)


def test_valid_window_fixed_and_official():
    x = np.zeros((3, 6, 25, 2))
    x[0, 1:5, 0, 0] = 1  # body 0 in frames 1-4 except a gap at 3
    x[0, 3, 0, 0] = 0
    x[0, 3:6, 0, 1] = 1  # body 1 in frames 3-5
    assert valid_window(x) == (1, 6)
    assert valid_window(x, official=True) == (0, 3)  # counts body 0's frames (3), from frame 0
    assert valid_window(np.zeros((3, 4, 25, 2))) == (0, 0)


def test_full_pipeline_by_hand():
    # Two frames, one body: spine shoulder (20) moves, shoulders lie along z (rotation by -90 deg),
    # joint 3 sits above the spine shoulder, 0.1 m to +x.
    x = np.zeros((3, 2, 25, 2), np.float32)
    root = np.array([[1, 1, 1], [2, 1, 2]], np.float32)
    for t in range(2):
        x[:, t, 20, 0] = root[t]
        x[:, t, 4, 0] = root[t] + [0, 0, -0.5]
        x[:, t, 8, 0] = root[t] + [0, 0, 0.5]
        x[:, t, 3, 0] = root[t] + [0.1, 0.3 + 0.2 * t, 0]
        x[:, t, 0, 0] = root[t] + [0, -0.5, 0]  # the official length counts frames where joint 0 is nonzero
    out = preprocess(x, frames=4)
    assert out.shape == (3, 4, 25, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 1], 0)  # absent body
    np.testing.assert_allclose(out[:, :, 20, 0], 0, atol=1e-7)
    np.testing.assert_allclose(out[:, :, 8, 0].T, [[0.5, 0, 0]] * 4, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 4, 0].T, [[-0.5, 0, 0]] * 4, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 3, 0].T, [[0, y, -0.1] for y in (0.3, 0.35, 0.45, 0.5)], atol=1e-6)
    # Same input through the official path: identical here up to the epsilon (one sign, no gaps).
    np.testing.assert_allclose(preprocess(x, frames=4, official=True), out, atol=1e-3)
    np.testing.assert_allclose(preprocess(x, frames=4, mode="resize")[:, :, 20, 0].T,
                               [[1, 1, 1], [1.25, 1, 1.25], [1.75, 1, 1.75], [2, 1, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="no frame with a body"):
        preprocess(np.zeros((3, 5, 25, 2)))
    with pytest.raises(ValueError, match=r"\(3, T, V, M\)"):
        preprocess(np.zeros((5, 25, 2)))


@pytest.mark.needs_data
def test_real_sample_fixed_aligns_exactly_official_approximately(shared_data):
    from skelemix.data.ntu import read_xyz
    raw = read_xyz(shared_data / "ntu" / "S001C001P001R001A055.skeleton")
    for official, bound in ((False, 1e-5), (True, 5e-2)):
        out = preprocess(raw, 64, official=official)
        v = out[:, :, 8] - out[:, :, 4]  # (3, 64, M)
        assert np.abs(out[:, :, 20]).max() == 0
        assert np.abs(v[2]).max() < bound
        assert (v[0] > 0).all()


def test_has_body_is_what_preprocess_can_keep():
    """Converters list a sample as missing skeletons when has_body is False, instead of failing in preprocess."""
    x = np.zeros((3, 5, 25, 2), np.float32)
    assert not has_body(x) and not has_body(x, official=True)
    x[:, 2, 3, 1] = 1.0  # only body 1 (joint 3) is present
    assert has_body(x) and not has_body(x, official=True)  # the official length counts body 0's first joint
    assert preprocess(x, 8).shape == (3, 8, 25, 2)
    with pytest.raises(ValueError, match="no frame with a body present"):
        preprocess(x, 8, official=True)
    x[:, 4, 0, 0] = 1.0
    assert has_body(x, official=True) and np.isfinite(preprocess(x, 8, official=True)).all()


def test_centre_first_keeps_the_path_and_each_frame_rigid():
    """centre="first": every frame moved by the first kept frame's origin and rotated by its angle, so the origin
    joint traces the body's path; each frame stays a rigid motion of the "frame" result (same pairwise
    distances). A body that does not move gives the "frame" result."""
    rng = np.random.default_rng(0)
    T, V = 12, 20
    body = rng.normal(size=(3, 1, V, 1)) * 0.3
    path = np.stack([np.linspace(0, 2, T), np.zeros(T), np.linspace(0, 1, T)])[:, :, None, None]
    x = np.zeros((3, T + 3, V, 1), np.float32)
    x[:, 3:] = body + path + rng.normal(size=(3, T, V, 1)) * 0.01  # 3 empty frames first: cut off
    by_frame = preprocess(x, T, center=2, shoulders=(4, 8))  # T kept frames resized to T: no interpolation
    by_first = preprocess(x, T, center=2, shoulders=(4, 8), centre="first")
    np.testing.assert_allclose(by_first[:, 0, 2, 0], 0, atol=1e-6)  # the origin joint starts at 0
    # ...and then moves as the path does (one rotation about y for the whole sequence keeps lengths)
    kept = x[:, 3:, 2, 0] - x[:, 3:4, 2, 0]
    np.testing.assert_allclose(np.linalg.norm(by_first[:, :, 2, 0], axis=0), np.linalg.norm(kept, axis=0), atol=1e-5)
    assert np.linalg.norm(by_first[:, -1, 2, 0]) > 2.0 and np.abs(by_frame[:, :, 2]).max() == 0
    for t in range(T):
        d = [np.linalg.norm(a[:, t, :, 0, None] - a[:, t, None, :, 0], axis=0) for a in (by_frame, by_first)]
        np.testing.assert_allclose(d[1], d[0], atol=1e-5)
    still = np.repeat(x[:, 3:4], T + 3, axis=1)
    np.testing.assert_allclose(preprocess(still, T, 2, (4, 8), centre="first"), preprocess(still, T, 2, (4, 8)),
                               atol=1e-6)
    with pytest.raises(ValueError, match="centre must be one of frame, first; got 'last'"):
        preprocess(x, T, centre="last")
