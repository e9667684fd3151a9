"""Generated skeleton actions for the demo and tests, in the format of prepared NTU data.

Eleven articulated actions are animated by forward kinematics on the NTU 25-joint skeleton (joint rotations
at the spine, neck, shoulders, elbows, hips and knees), two of them two-person interactions. Every sample
varies the subject (overall size and per-segment bone lengths), the tempo, amplitude and phase of the
motion, the side for one-sided actions, the camera (yaw, pitch) and the sensor noise. Each body is then
centred on its own spine-shoulder joint per frame, as the NTU preprocessing does, so the arrays look like
``(N, 3, T, 25, 2)`` prepared data and every code path runs on them unchanged.
"""
from __future__ import annotations

import numpy as np

from ..graph import NTU

CLASSES = ("wave", "punch", "kick", "squat", "jump", "bow", "clap", "walk", "arm_circles", "handshake", "push")
TWO_PERSON = ("handshake", "push")

# Kinematic tree rooted at the spine base (index 0): joint -> (parent, rest offset from the parent in metres,
# body frame: x to the subject's left, y up, z forward).
_SKELETON = {
    1: (0, (0, 0.28, 0)), 20: (1, (0, 0.22, 0)), 2: (20, (0, 0.07, 0)), 3: (2, (0, 0.13, 0)),
    4: (20, (0.17, -0.02, 0)), 5: (4, (0, -0.27, 0)), 6: (5, (0, -0.25, 0)), 7: (6, (0, -0.07, 0)),
    21: (7, (0, -0.08, 0)), 22: (7, (0, -0.04, 0.03)),
    8: (20, (-0.17, -0.02, 0)), 9: (8, (0, -0.27, 0)), 10: (9, (0, -0.25, 0)), 11: (10, (0, -0.07, 0)),
    23: (11, (0, -0.08, 0)), 24: (11, (0, -0.04, 0.03)),
    12: (0, (0.09, -0.03, 0)), 13: (12, (0, -0.42, 0)), 14: (13, (0, -0.40, 0)), 15: (14, (0, -0.05, 0.10)),
    16: (0, (-0.09, -0.03, 0)), 17: (16, (0, -0.42, 0)), 18: (17, (0, -0.40, 0)), 19: (18, (0, -0.05, 0.10)),
}
_ORDER = [1, 20, 2, 3, 4, 5, 6, 7, 21, 22, 8, 9, 10, 11, 23, 24, 12, 13, 14, 15, 16, 17, 18, 19]
# Joints whose rotation moves a limb, by side: shoulder, elbow, hip, knee.
_LIMB = {"left": (4, 5, 12, 13), "right": (8, 9, 16, 17)}


def _rot(axis: str, angle) -> np.ndarray:
    """Rotation matrices ``(T, 3, 3)`` about a body axis for angles ``(T,)`` in radians."""
    angle = np.asarray(angle, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    o, z = np.ones_like(angle), np.zeros_like(angle)
    m = {"x": [[o, z, z], [z, c, -s], [z, s, c]],
         "y": [[c, z, s], [z, o, z], [-s, z, c]],
         "z": [[c, -s, z], [s, c, z], [z, z, o]]}[axis]
    return np.moveaxis(np.array(m), (0, 1), (-2, -1))


def _flex(angle):
    """Swing a limb that hangs down forward (and a straight spine forward) by ``angle``."""
    return _rot("x", -np.asarray(angle))


def _raise_side(angle, side):
    """Raise a hanging limb sideways, away from the body."""
    return _rot("z", np.asarray(angle) * (1 if side == "left" else -1))


def _bend(angle):
    """Bend a knee (the shank swings backward)."""
    return _rot("x", np.asarray(angle))


def _pose(rotations: dict, lengths: dict, T: int) -> np.ndarray:
    """Forward kinematics: joint positions ``(T, 25, 3)`` relative to the spine base."""
    pos = np.zeros((T, NTU.num_joints, 3))
    world = {0: rotations.get(0, np.broadcast_to(np.eye(3), (T, 3, 3)))}
    for j in _ORDER:
        parent, _ = _SKELETON[j]
        pos[:, j] = pos[:, parent] + world[parent] @ lengths[j]
        local = rotations.get(j)
        world[j] = world[parent] if local is None else world[parent] @ local
    return pos


def _motion(action: str, phase: np.ndarray, amp: float, side: str, rng) -> tuple[dict, np.ndarray]:
    """Joint rotations and root translation ``(T, 3)`` of one action; ``phase`` runs over the action's
    cycles (radians)."""
    T = len(phase)
    s, c = np.sin(phase), np.cos(phase)
    pulse = 0.5 - 0.5 * np.cos(phase)  # 0 -> 1 -> 0 once per cycle
    sh, el, hip, kn = _LIMB[side]
    osh, oel, ohip, okn = _LIMB["left" if side == "right" else "right"]
    rot, root = {}, np.zeros((T, 3))
    if action == "wave":
        rot[sh] = _raise_side(np.full(T, 2.4 * amp), side)
        rot[el] = _raise_side(0.5 * amp * s, side) @ _flex(np.full(T, 0.3))
    elif action == "punch":
        rot[sh] = _flex(np.full(T, 1.5 * amp))
        rot[el] = _flex(1.9 * amp * (1 - pulse ** 3))
        rot[osh], rot[oel] = _flex(np.full(T, 0.6)), _flex(np.full(T, 1.9))  # guard
    elif action == "kick":
        rot[hip] = _flex(1.2 * amp * pulse)
        rot[kn] = _bend(1.2 * amp * np.clip(np.sin(phase - 0.8), 0, None))
    elif action == "squat":
        rot[hip] = rot[ohip] = _flex(1.5 * amp * pulse)
        rot[kn] = rot[okn] = _bend(1.9 * amp * pulse)
        rot[1] = _flex(0.4 * amp * pulse)
        rot[sh] = rot[osh] = _flex(1.3 * amp * pulse)
        root[:, 1] = -0.35 * amp * pulse
    elif action == "jump":
        crouch = np.clip(np.cos(phase), 0, None)
        rot[hip] = rot[ohip] = _flex(0.8 * amp * crouch)
        rot[kn] = rot[okn] = _bend(1.0 * amp * crouch)
        rot[sh] = rot[osh] = _flex(2.4 * amp * np.clip(-np.cos(phase), 0, None))
        root[:, 1] = 0.3 * amp * np.clip(-np.cos(phase), 0, None) - 0.15 * amp * crouch
    elif action == "bow":
        rot[1] = _flex(0.9 * amp * pulse)
        rot[2] = _flex(0.3 * amp * pulse)
    elif action == "clap":
        inward = 0.45 * amp * pulse
        rot[sh] = _flex(np.full(T, 1.3)) @ _raise_side(-inward, side)
        rot[osh] = _flex(np.full(T, 1.3)) @ _raise_side(-inward, "left" if side == "right" else "right")
        rot[el] = rot[oel] = _flex(np.full(T, 0.5))
    elif action == "walk":
        rot[hip], rot[ohip] = _flex(0.45 * amp * s), _flex(-0.45 * amp * s)
        rot[kn], rot[okn] = _bend(0.8 * amp * np.clip(-s, 0, None)), _bend(0.8 * amp * np.clip(s, 0, None))
        rot[sh], rot[osh] = _flex(-0.4 * amp * s), _flex(0.4 * amp * s)
        root[:, 2] = 0.25 * amp * np.linspace(0, 1, T)
        root[:, 1] = 0.02 * np.abs(c)
    elif action == "arm_circles":
        for j, sd in ((sh, side), (osh, "left" if side == "right" else "right")):
            rot[j] = _raise_side(1.5 + 0.35 * amp * c, sd) @ _flex(0.35 * amp * s)
    elif action == "handshake":
        rot[sh] = _flex(0.8 + 0.12 * amp * s)
        rot[el] = _flex(np.full(T, 0.7))
    elif action == "push":
        rot[sh] = rot[osh] = _flex(np.full(T, 1.4 * amp))
        rot[el] = rot[oel] = _flex(1.6 * (1 - pulse))
    else:
        raise ValueError(f"unknown action {action!r}")
    rot[sh] = rot.get(sh, np.broadcast_to(np.eye(3), (T, 3, 3))) @ _rot("y", rng.normal(0, 0.05, T).cumsum() * 0.1)
    return rot, root


def _partner(action: str, phase: np.ndarray, amp: float, side: str) -> tuple[dict, np.ndarray]:
    """The second person of an interaction (facing the first)."""
    T = len(phase)
    pulse = 0.5 - 0.5 * np.cos(phase)
    sh, el, _, _ = _LIMB[side]
    rot, root = {}, np.zeros((T, 3))
    if action == "handshake":
        rot[sh] = _flex(0.8 + 0.12 * amp * np.sin(phase))
        rot[el] = _flex(np.full(T, 0.7))
    else:  # pushed: leans and steps back
        rot[1] = _flex(-0.35 * amp * pulse)
        root[:, 2] = -0.3 * amp * pulse
    return rot, root


def _with_idle_posture(rot: dict, T: int, rng) -> dict:
    """Give every joint the action does not drive a random resting angle, and jitter the driven ones, so
    that classes differ by how the body moves rather than by a static pose."""
    out = dict(rot)
    for side in ("left", "right"):
        sh, el, hip, kn = _LIMB[side]
        idle = {sh: _flex([rng.uniform(-0.3, 2.0)])[0] @ _raise_side([rng.uniform(0, 2.6)], side)[0],
                el: _flex([rng.uniform(0, 1.8)])[0],
                hip: _flex([rng.uniform(-0.15, 0.35)])[0] @ _raise_side([rng.uniform(0, 0.25)], side)[0],
                kn: _bend([rng.uniform(0, 0.4)])[0]}
        for j, r in idle.items():
            out[j] = np.broadcast_to(r, (T, 3, 3)) if j not in rot else (
                _flex([rng.normal(0, 0.25)])[0] @ _raise_side([rng.normal(0, 0.25)], side)[0] @ rot[j])
    for j in (1, 2):
        lean = _flex([rng.normal(0, 0.12)])[0] @ _rot("z", [rng.normal(0, 0.08)])[0]
        out[j] = lean @ rot[j] if j in rot else np.broadcast_to(lean, (T, 3, 3))
    return out


def _subject(rng) -> dict:
    size = rng.uniform(0.85, 1.15)
    return {j: np.asarray(off, dtype=np.float64) * size * rng.uniform(0.93, 1.07) for j, (_, off) in _SKELETON.items()}


def _camera(rng) -> np.ndarray:
    yaw, pitch = rng.uniform(-np.pi / 2, np.pi / 2), rng.uniform(-0.15, 0.15)
    return _rot("x", [pitch])[0] @ _rot("y", [yaw])[0]


def _sample(action: str, frames: int, rng) -> np.ndarray:
    """One sample: ``(2, frames, 25, 3)`` world coordinates (second body zero for one-person actions)."""
    cycles = {"wave": 3, "punch": 2.5, "kick": 1.5, "squat": 1.5, "jump": 1.5, "bow": 1, "clap": 4, "walk": 1.5,
              "arm_circles": 2.5, "handshake": 3, "push": 1}[action] * rng.uniform(0.75, 1.3)
    start = rng.uniform(0, 2 * np.pi) if action not in ("bow", "push") else rng.uniform(-0.6, 0.3)
    phase = start + 2 * np.pi * cycles * np.arange(frames) / frames
    amp = rng.uniform(0.75, 1.15)
    side = "right" if rng.random() < 0.7 else "left"
    camera = _camera(rng)
    bodies = np.zeros((2, frames, NTU.num_joints, 3))
    rot, root = _motion(action, phase, amp, side, rng)
    placement = [(np.eye(3), np.zeros(3))]
    motions = [(rot, root)]
    if action in TWO_PERSON:
        gap = rng.uniform(0.7, 1.0)
        placement = [(np.eye(3), np.array([0, 0, -gap / 2])), (_rot("y", [np.pi])[0], np.array([0, 0, gap / 2]))]
        # The partner's free hand is on the same side of the scene: facing each other mirrors sides.
        motions.append(_partner(action, phase, amp, side))
    elif rng.random() < 0.4:  # a bystander, as in real recordings (NTU's A027 files carry a noise body)
        placement.append((_rot("y", [rng.uniform(-np.pi, np.pi)])[0], np.array([rng.uniform(-1.5, 1.5), 0, 0.5])))
        motions.append(({}, np.zeros((frames, 3))))
    for b, ((body_rot, offset), (r, tr)) in enumerate(zip(placement, motions)):
        pose = _pose(_with_idle_posture(r, frames, rng), _subject(rng), frames) + tr[:, None, :]
        pose = pose @ body_rot.T + offset
        bodies[b] = pose @ camera.T + rng.normal(0, 0.008, pose.shape)
    return bodies


def make_synthetic(num_samples: int, num_classes: int = len(CLASSES), frames: int = 64, seed: int = 0):
    """Generate ``num_samples`` labelled sequences of the first ``num_classes`` actions of :data:`CLASSES`.

    Returns ``(data, labels)``: float32 ``(N, 3, frames, 25, 2)`` and int64 ``(N,)``. Classes are balanced
    and shuffled; the same ``seed`` gives the same arrays. Each body is centred on its own joint 20 (spine
    shoulder) in every frame, as prepared NTU data is; absent second bodies are zero.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(CLASSES)}]; got {num_classes}")
    if num_samples < 1 or frames < 2:
        raise ValueError(f"num_samples must be >= 1 and frames >= 2; got {num_samples}, {frames}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    data = np.zeros((num_samples, 3, frames, NTU.num_joints, 2), dtype=np.float32)
    for i, label in enumerate(labels):
        bodies = _sample(CLASSES[label], frames, rng)
        present = np.abs(bodies).sum(axis=(1, 2, 3)) > 0
        bodies[present] -= bodies[present][:, :, NTU.root: NTU.root + 1]
        data[i] = bodies.transpose(3, 1, 2, 0)
    return data, labels.astype(np.int64)
