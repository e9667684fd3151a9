"""train.cuda_graph: the step's random draws split from its device work (CPU, bitwise against the step as it
was written before the split), the sync-free queue, the config checks, and (needs_cuda) the captured step."""
import math

import pytest
import torch

from skelemix import augment, reference, train
from skelemix.augment import apply_augment, draw_augment, pretrain_augment, to_view
from skelemix.config import ConfigError, build_config
from skelemix.mix import SkeleMix
from skelemix.models import build_pretrain_model
from skelemix.graph import get_layout
from skelemix.train import GraphedStep, Trainer

from test_train import TINY, run

MIXES = {
    "swap": [],
    "bone view, per-sample derangement": ["data.view=bone", "model.per_sample=true", "model.partner=derangement"],
    "gaussian fill, random joints": ["data.view=motion", "model.mix_mode=gaussian", "model.spatial_mode=random"],
    "zeros fill, per-sample": ["model.mix_mode=zeros", "model.per_sample=true"],
}


def _trainer(tmp_path, *extra) -> Trainer:
    return Trainer(build_config({}, TINY + [f"train.out={tmp_path}", "train.workers=0", *extra]), progress=False)


def _batches(trainer, steps):
    trainer.sampler.set_epoch(1, 0)
    out = []
    while len(out) < steps:
        out += list(trainer.data.batches())
    return out[:steps]


def _legacy_step(trainer, x):
    """The training step as train.py wrote it before the split: each augmentation and the mixing draw from
    the generator where they run."""
    c = trainer.config
    views = [to_view(pretrain_augment(x, c.data.shear, c.data.temporal_ratio, generator=trainer.generator),
                     c.data.view, c.model.layout) for _ in range(2)]
    out = trainer.net(views[0], views[1], generator=trainer.generator)
    parts = dict(zip(out, torch.stack([v.detach().float() for v in out.values()]).tolist()))
    trainer.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    trainer.optimizer.step()
    return parts


def _same(a: dict, b: dict) -> bool:
    """Equal logged values (NaN equal to NaN: loss_p is NaN with zeros/gaussian fills)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.parametrize("sync_free", [False, True], ids=["step", "captured step's code"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_split_step_is_bitwise_the_step_before_the_split(tmp_path, mix, sync_free):
    """Host draws then device work (train_step; with sync_free=True the code the graph captures, run
    uncaptured) give bitwise the losses, weights, queue and generator state of the unsplit step, over 3 steps."""
    # One after the other: each Trainer seeds the global RNG (dropout) when it is built.
    a = _trainer(tmp_path / "a", *MIXES[mix])
    batches = _batches(a, 3)
    legacy = [_legacy_step(a, x.clone()) for x in batches]
    b = _trainer(tmp_path / "b", *MIXES[mix])
    b.sync_free = sync_free
    assert all(_same(b.train_step(x.clone()), parts) for x, parts in zip(batches, legacy))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert int(sa["queue_ptr"]) == (3 * 8) % 16
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_draw_then_apply_is_pretrain_augment():
    x = torch.randn(5, 3, 24, 25, 2)
    for amplitude, ratio in ((0.5, 6), (0.0, 6), (0.5, 0), (0.3, 100)):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        draws = draw_augment(x.shape, amplitude, ratio, g1)
        assert set(draws) == {k for k, on in (("shift", 24 // ratio if ratio > 0 else 0), ("shear", amplitude > 0))
                              if on}
        assert torch.equal(apply_augment(x, draws), pretrain_augment(x, amplitude, ratio, generator=g2))
        assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(ValueError, match="shear needs 3 coordinates per joint; x has C=2"):
        draw_augment((5, 2, 24, 25, 2), 0.5, 6)


def test_bone_view_parents_come_from_a_device_cache():
    x = torch.randn(2, 3, 8, 25, 1)
    parents = get_layout("ntu-rgb+d").parents()
    assert torch.equal(to_view(x, "bone"), x - x[:, :, :, parents])
    assert augment._parents(tuple(parents), x.device) is augment._parents(tuple(parents), x.device)


@pytest.mark.parametrize("per_sample", [False, True])
def test_the_eager_gather_is_the_fused_gather(per_sample):
    """SkeleMix.apply (what the captured step runs) mixes through skelemix_gather without value checks: the eager
    reference (device-side indexing only, no host synchronisation) gives the fused kernel's bits."""
    layout = get_layout("ntu-rgb+d")
    x = torch.randn(6, 3, 16, 25, 2)
    results = []
    for impl in ("auto", "eager"):  # auto: the C++ kernel where it is built
        mixer = SkeleMix(layout.body_parts, layout.num_joints, (2, 3), (1, 3), block=4, per_sample=per_sample,
                         impl=impl)
        results.append(mixer.apply(x, mixer.draw(x.shape, 3, torch.Generator().manual_seed(1))))
    fused, eager = results
    assert len(fused) == len(eager) == 3
    for a, b in zip(fused, eager):
        assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask) and torch.equal(a.partner, b.partner)
    mask = torch.rand(3, 2, 5, 25) > 0.5
    for frames in (20, 18):  # a partial last block too
        assert torch.equal(reference.frame_region(mask, 4, frames), mask.repeat_interleave(4, dim=-2)[..., :frames, :])


def test_enqueue_matches_the_host_pointer_version_through_wrap_arounds():
    model = build_pretrain_model("skeletonclr", encoder=dict(hidden_channels=4, hidden_dim=8), feature_dim=4,
                                 queue_size=12)
    queue, ptr = model.queue.clone(), 0
    for step in range(7):  # 7 batches of 4 in a queue of 12: the pointer wraps twice
        keys = torch.randn(4, 4)
        model._enqueue(keys)
        queue[:, ptr:ptr + 4] = keys.T  # the enqueue before it kept the pointer on the host
        ptr = (ptr + 4) % 12
        assert torch.equal(model.queue, queue) and int(model.queue_ptr) == ptr, step
    # A batch running over the end (possible only through a resumed pointer) continues at the start.
    model.queue_ptr.fill_(10)
    keys = torch.randn(4, 4)
    model._enqueue(keys)
    assert torch.equal(model.queue[:, [10, 11, 0, 1]], keys.T) and int(model.queue_ptr) == 2
    with pytest.raises(ValueError, match=r"queue_size \(12\) must be a multiple of the global batch size \(5\)"):
        model._enqueue(torch.randn(5, 4))


@pytest.mark.parametrize("override, message", [
    ("train.cuda_graph=fast", r"train.cuda_graph: expected one of auto, on, off; got 'fast'"),
    ("train.cuda_graph=on", r"train.cuda_graph=on: expected a CUDA device; got train.device cpu"),
])
def test_cuda_graph_config_errors(tmp_path, capsys, override, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, TINY + ["train.device=cpu", override])
    assert run(tmp_path, "--set", "train.device=cpu", "--set", override) == 2
    assert "error: " + message.replace("\\", "") in capsys.readouterr().err


def test_cuda_graph_on_needs_a_cuda_device_and_one_process(tmp_path, monkeypatch):
    """Checked by the trainer, which resolves train.device=auto and knows the number of processes."""
    monkeypatch.setattr(train, "resolve_device", lambda name: torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.cuda_graph=on: expected a CUDA device; got device cpu"):
        _trainer(tmp_path, "train.cuda_graph=on")
    monkeypatch.setattr(train, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(train.distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"train.cuda_graph=on: expected one process; got 2"):
        _trainer(tmp_path, "train.cuda_graph=on", "train.impl=eager")


def test_cuda_graph_auto_and_off_do_not_capture(tmp_path):
    for value in ("auto", "off"):
        trainer = _trainer(tmp_path, f"train.cuda_graph={value}")
        assert trainer.config.train.cuda_graph == value  # a bare YAML off (a bool) reads as "off"
        assert trainer.graphed is None and not trainer.sync_free
    assert build_config({"train": {"cuda_graph": True}}).train.cuda_graph == "on"


# ---------------------------------------------------------------------------------------------- GPU
GPU = ["train.device=cuda", "data.synthetic_train=64", "model.queue_size=32", "optim.lr=0.01"]
OPTIMS = {"sgd": [], "adamw": ["optim.name=adamw", "optim.lr=0.001"]}


def _run_steps(tmp_path, steps, *extra):
    trainer = _trainer(tmp_path, *GPU, *extra)
    if trainer.graphed is None:  # the same AdamW update as the captured run's (step counters on the device)
        for group in trainer.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
    parts = [trainer.train_step(x) for x in _batches(trainer, steps)]
    torch.cuda.synchronize()
    return trainer, parts


@pytest.mark.needs_cuda
@pytest.mark.parametrize("optim", list(OPTIMS))
def test_captured_training_follows_the_uncaptured_one(tmp_path, optim):
    """7 steps with train.cuda_graph=on (3 warm-up steps, a capture, 4 replays) against =off: every logged
    value within 1e-3 relative (the same draws, the same dropout offsets; only the order of floating-point
    reductions may differ), the weights, queue and BN statistics within 1e-3 relative + 1e-5 absolute."""
    off, parts_off = _run_steps(tmp_path / "off", 7, "train.cuda_graph=off", *OPTIMS[optim])
    on, parts_on = _run_steps(tmp_path / "on", 7, "train.cuda_graph=on", *OPTIMS[optim])
    assert on.graphed.graph is not None and on.graphed.steps == 7
    for step, (a, b) in enumerate(zip(parts_off, parts_on), 1):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isfinite(a[k]) and math.isfinite(b[k]), (step, k, a[k], b[k])
            assert abs(a[k] - b[k]) <= 1e-3 * max(abs(a[k]), 1e-3), (step, k, a[k], b[k])
    s_off, s_on = off.model.state_dict(), on.model.state_dict()
    for k in s_off:
        torch.testing.assert_close(s_on[k], s_off[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert int(s_on["queue_ptr"]) == (7 * 8) % 32


@pytest.mark.needs_cuda
def test_replays_apply_updates_and_a_new_lr_is_captured_again(tmp_path):
    trainer = _trainer(tmp_path, *GPU, "train.cuda_graph=on")
    batches = _batches(trainer, 6)
    for x in batches[:4]:
        trainer.train_step(x)  # 3 warm-up steps, then the capture and its replay
    graph = trainer.graphed.graph
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_step(batches[4])
    assert trainer.graphed.graph is graph  # replayed, not captured again
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0  # as the schedule does at an epoch boundary
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_step(batches[5])
    assert trainer.graphed.graph is not graph
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))  # p - 0 * momentum: unchanged


@pytest.mark.needs_cuda
def test_graphed_step_matches_eager_and_recaptures_on_lr_change():
    """A toy regression through GraphedStep against the same steps run eagerly, with an lr change midway."""
    device = torch.device("cuda")

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(device)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def forward(model):
        return lambda x, draws: {"loss": ((model(x * draws["scale"]) - 1) ** 2).mean()}

    data = [(torch.randn(16, 6, device=device), {"scale": torch.rand(16, 1)}) for _ in range(8)]
    eager, opt_e = make()
    losses_e = []
    for i, (x, draws) in enumerate(data):
        if i == 5:
            opt_e.param_groups[0]["lr"] = 0.01
        loss = forward(eager)(x, {"scale": draws["scale"].to(device)})["loss"]
        opt_e.zero_grad(set_to_none=True)
        loss.backward()
        opt_e.step()
        losses_e.append(loss.item())
    graphed, opt_g = make()
    step = GraphedStep(forward(graphed), opt_g, device, warmup=2)
    losses_g, graphs = [], []
    for i, (x, draws) in enumerate(data):
        if i == 5:
            opt_g.param_groups[0]["lr"] = 0.01
        losses_g.append(step(x, draws)["loss"])
        graphs.append(step.graph)
    assert graphs[:2] == [None, None] and graphs[2] is graphs[4] is not None and graphs[5] is not graphs[4]
    torch.testing.assert_close(torch.tensor(losses_g), torch.tensor(losses_e), rtol=1e-5, atol=1e-7)
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.needs_cuda
def test_device_randomness_differs_between_replays():
    """Dropout and torch.randint (the fused epilogue's seed) draw from the default CUDA generator, which the
    capture registers: every replay draws new values."""
    device = torch.device("cuda")
    weight = torch.nn.Parameter(torch.ones(64, device=device))
    opt = torch.optim.SGD([weight], lr=0.0)
    masks, seeds = torch.zeros(64, device=device, dtype=torch.bool), torch.zeros(1, device=device, dtype=torch.long)

    def forward(x, draws):
        y = torch.nn.functional.dropout(weight * x, p=0.5, training=True)
        masks.copy_(y == 0)
        seeds.copy_(torch.randint(0, 2**31 - 1, (1,), device=device))
        return {"loss": y.sum()}

    step = GraphedStep(forward, opt, device, warmup=1)
    seen = []
    for _ in range(5):
        step(torch.ones(64, device=device), {})
        seen.append((masks.clone(), int(seeds)))
    assert step.graph is not None
    replays = seen[1:]  # the first call is the eager warm-up
    assert len({s for _, s in replays}) == len(replays)
    assert all(not torch.equal(a, b) for (a, _), (b, _) in zip(replays, replays[1:]))
    assert all(10 < int(m.sum()) < 54 for m, _ in replays)


@pytest.mark.needs_cuda
def test_nan_loss_is_caught_after_the_replay(tmp_path):
    trainer = _trainer(tmp_path, *GPU, "train.cuda_graph=on")
    batches = _batches(trainer, 5)
    for x in batches[:4]:
        trainer.train_step(x)
    x = batches[4].clone()
    x[0, 0, 0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match=r"at step 1 .*checks after the replay"):
        trainer.train_step(x)


@pytest.mark.needs_cuda
def test_captured_run_through_the_command_line(tmp_path):
    """3 epochs of 2 steps: warm-up, capture and replays across epoch boundaries, kNN monitor and checkpoints."""
    from test_train import step_losses

    cuda = ["--set", "train.device=cuda"]
    assert run(tmp_path, "--epochs", "3", *cuda, "--set", "train.cuda_graph=on") == 0  # the demo's AdamW
    losses = step_losses(tmp_path)
    assert len(losses) == 6 and all(math.isfinite(v) for _, v in losses)
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert int(state["model"]["queue_ptr"]) == (6 * 8) % 16
    assert all(s["step"].is_cuda for s in state["optimizer"]["state"].values())


@pytest.mark.needs_cuda
def test_resume_switches_cuda_graph_both_ways(tmp_path):
    """AdamW's step counters follow the run: host tensors without the graph, device tensors (capturable) with it."""
    cuda = ["--set", "train.device=cuda"]
    assert run(tmp_path, "--epochs", "5", *cuda, "--max-steps", "2", "--set", "train.cuda_graph=off") == 0
    # Steps 3-5 warm up, step 6 is captured, step 7 replayed.
    assert run(tmp_path, "--epochs", "5", *cuda, "--max-steps", "7", "--resume", "--set", "train.cuda_graph=on") == 0
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert all(s["step"].is_cuda for s in state["optimizer"]["state"].values())
    assert run(tmp_path, "--epochs", "5", *cuda, "--resume", "--set", "train.cuda_graph=off") == 0
    from test_train import step_losses

    losses = step_losses(tmp_path)
    assert [s for s, _ in losses] == list(range(1, 11)) and all(math.isfinite(v) for _, v in losses)
