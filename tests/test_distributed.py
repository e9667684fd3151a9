"""Distributed pretraining on the CPU with the gloo backend: two processes through torch.multiprocessing
(the model-level checks) and through torchrun (the commands of the "Multi-GPU training" section of
docs/TRAINING.md)."""
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from skelemix import distributed
from skelemix.config import build_config, make_pretrain_model

ROOT = Path(__file__).resolve().parents[1]
B = 4  # per-rank batch; the one-process reference runs 2B
STEPS = 5  # 5 global batches of 8 keys wrap the 32-key queue
LR = 0.1
BN_MODES = ("sync", "per_rank", "shuffle")
# Dropout off and a fixed mix (FixedMix) so that both runs see the same inputs; SGD moves the weights a lot.
MODEL = ["data.frames=16", "model.hidden_channels=4", "model.hidden_dim=16", "model.feature_dim=8",
         "model.queue_size=32", "model.momentum=0.9", "model.dropout=0.0", "model.swap_params=[[2, 3, 1, 2, 1, 1.0]]",
         "train.batch_size=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FixedMix:
    """Stands in for the random SkeleMix draw: one fixed region (arms, blocks 1-2) and the partner of sample i
    inside i's group of B samples, so a batch of 2B in one process and its halves on two ranks (whose partners
    are drawn within the rank's batch) are mixed identically."""

    def __init__(self, num_joints: int, blocks: int, block: int):
        self.mask = torch.zeros(1, blocks, num_joints, dtype=torch.bool)
        self.mask[0, 1:3, 4:12] = True
        self.block = block
        self.shift = torch.tensor([2, 3, 1, 0])  # a derangement of B = 4

    def __call__(self, x, generator=None):
        i = torch.arange(x.shape[0])
        partner = (i // B) * B + self.shift[i % B]
        region = self.mask.repeat_interleave(self.block, dim=1)[:, None, :, :, None]
        return types.SimpleNamespace(x=torch.where(region, x[partner], x), mask=self.mask, partner=partner)

    def batches(self, x, repeats, generator=None):  # what SkeleMixCLR.forward calls: R mixes of one view
        return [self(x, generator) for _ in range(repeats)]


def _batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(2 * B, 3, 16, 25, 2, generator=g), torch.randn(2 * B, 3, 16, 25, 2, generator=g))
            for _ in range(STEPS)]


def _train(bn: str, dtype=torch.float32):
    """STEPS SGD steps on this rank's share of the fixed batches; returns the model, the per-step losses (means
    over the ranks), the keys this rank handed to the queue at each step and encoder_q's gradients."""
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(0)
    model = make_pretrain_model(build_config({}, MODEL + [f"dist.bn={bn}"]))
    if world > 1 and bn == "sync":
        model = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    model = model.to(dtype)
    model.shuffle_key_bn = bn == "shuffle"
    model.mixers[0] = FixedMix(25, 4, model.encoder_q.temporal_stride)
    keys, enqueue = [], model._enqueue
    model._enqueue = lambda k: (keys.append(k.clone()), enqueue(k))[1]
    net = distributed.wrap(model, torch.device("cpu"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    n = 2 * B // world
    losses, grads = [], []
    for xq, xk in _batches():
        part = slice(rank * n, (rank + 1) * n)
        out = net(xq[part].to(dtype), xk[part].to(dtype), generator=g)
        losses.append(distributed.mean_over_ranks(torch.stack([out[k].detach() for k in
                                                               ("loss", "loss_ins", "loss_p", "loss_c")])))
        opt.zero_grad()
        out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()]))
        opt.step()
    return model, torch.stack(losses), keys, torch.stack(grads)


def _worker(rank: int, port: int, out: str):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init("gloo", torch.device("cpu"))  # the env:// path torchrun uses
    try:
        result = {}
        for bn in BN_MODES + ("sync64",):
            model, losses, keys, grads = _train(bn.removesuffix("64"), torch.float64 if "64" in bn else torch.float32)
            params = torch.cat([p.detach().flatten() for p in model.parameters()])  # encoder_q and encoder_k
            both = distributed.all_gather(params[None])
            queues = distributed.all_gather(model.queue[None])
            result[bn] = dict(losses=losses, queue=model.queue.clone(), ptr=int(model.queue_ptr),
                              grads=grads, global_keys=torch.stack([distributed.all_gather(k) for k in keys]),
                              params_equal=torch.equal(both[0], both[1]), queue_equal=torch.equal(queues[0], queues[1]),
                              encoder_q=torch.cat([p.detach().flatten() for p in model.encoder_q.parameters()]),
                              encoder_k=torch.cat([p.detach().flatten() for p in model.encoder_k.parameters()]))

        # Shuffled BN: each rank's outputs are those of its own samples, encoded inside rank 0's permutation.
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
        x = torch.randn(B, 6, generator=torch.Generator().manual_seed(10 + rank))
        got = distributed.shuffled_forward(enc, x, torch.Generator().manual_seed(5))
        everything = distributed.all_gather(x)
        perm = torch.randperm(2 * B, generator=torch.Generator().manual_seed(5))  # rank 0's draw
        with torch.no_grad():
            expected = torch.cat([enc(everything[perm[j * B:(j + 1) * B]]) for j in range(2)])
            expected = expected[torch.argsort(perm)][rank * B:(rank + 1) * B]
            torch.manual_seed(0)
            enc = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()  # fresh: the same statistics everywhere
            result["shuffle_eval_err"] = (distributed.shuffled_forward(enc, x) - enc(x)).abs().max().item()
        result["shuffle_train_err"] = (got - expected).abs().max().item()
        result["shuffle_differs_from_local"] = not torch.allclose(got, enc.train()(x).detach(), atol=1e-4)

        # Evaluation shards of different sizes come back whole and in order.
        rows = torch.arange(7 * 3.0).view(7, 3)
        result["gather_rows_ok"] = torch.equal(distributed.gather_rows(rows[distributed.shard(7).start:
                                                                            distributed.shard(7).stop]), rows)
        if rank == 0:
            torch.save(result, Path(out) / "rank0.pt")
    finally:
        distributed.cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out / "rank0.pt", weights_only=False)


@pytest.fixture(scope="module")
def one_rank():
    """The reference: one process, batch 2B, plain BatchNorm over the whole batch, in float32 and float64."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        model, losses, keys, grads = _train("per_rank", dtype)
        out[dtype] = dict(model=model, losses=losses, keys=keys, grads=grads)
    return out


@pytest.mark.parametrize("bn", BN_MODES)
def test_queue_holds_every_ranks_keys_in_order(two_ranks, bn):
    r = two_ranks[bn]
    K, n = 32, 2 * B
    assert r["global_keys"].shape == (STEPS, n, 8)
    assert r["ptr"] == STEPS * n % K
    for step in range(STEPS - K // n, STEPS):  # the last K / n global batches are all still in the queue
        start = step * n % K
        assert torch.equal(r["queue"][:, start:start + n], r["global_keys"][step].T), step


@pytest.mark.parametrize("bn", BN_MODES)
def test_parameters_and_queue_identical_on_every_rank(two_ranks, bn):
    r = two_ranks[bn]
    assert r["params_equal"] and r["queue_equal"]
    assert not torch.allclose(r["encoder_q"], r["encoder_k"])  # both moved, differently: momentum 0.9


def _flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def test_two_ranks_with_syncbn_equal_one_rank_with_twice_the_batch(two_ranks, one_rank):
    """Same initial weights, same inputs, same mixes, no dropout: with SyncBN the global batch is the unit, so
    all four loss terms, every key in the queue, encoder_q's gradients and the weights match the one-process
    run with batch 2B.

    float64, 5 SGD steps (the queue wraps): agreement to rounding. float32, the first step: agreement within
    fp32 tolerance. Later float32 steps are not compared: this tiny random network amplifies 1e-6 differences
    in the weights into 1e-2 differences in its next gradients, in one process as much as in two."""
    sync, ref = two_ranks["sync64"], one_rank[torch.float64]
    tight = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sync["losses"], ref["losses"], **tight)
    torch.testing.assert_close(sync["global_keys"], torch.stack(ref["keys"]), **tight)
    torch.testing.assert_close(sync["queue"], ref["model"].queue, **tight)
    torch.testing.assert_close(sync["grads"], ref["grads"], **tight)
    torch.testing.assert_close(sync["encoder_q"], _flat(ref["model"].encoder_q.parameters()), **tight)
    torch.testing.assert_close(sync["encoder_k"], _flat(ref["model"].encoder_k.parameters()), **tight)

    sync, ref = two_ranks["sync"], one_rank[torch.float32]
    torch.testing.assert_close(sync["losses"][0], ref["losses"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sync["global_keys"][0], ref["keys"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sync["grads"][0], ref["grads"][0], rtol=1e-4, atol=1e-4 * ref["grads"][0].abs().max())
    # The comparison can tell: per-rank BN normalises over B samples, which changes the numbers.
    assert (two_ranks["per_rank"]["losses"][0] - ref["losses"][0]).abs().max() > 1e-3


def test_shuffled_bn_returns_each_ranks_own_keys(two_ranks):
    assert two_ranks["shuffle_eval_err"] < 1e-6  # eval-mode BN: per-sample, so shuffling must change nothing
    assert two_ranks["shuffle_train_err"] < 1e-6  # train mode: batch statistics of rank 0's permuted slices
    assert two_ranks["shuffle_differs_from_local"]


def test_gather_rows_of_uneven_shards(two_ranks):
    assert two_ranks["gather_rows_ok"]


def test_sampler_splits_global_batches_and_resumes_mid_epoch():
    data = list(range(21))
    one = distributed.ResumableDistributedSampler(data, global_batch=8)
    one.set_epoch(3)
    full = list(one)
    assert len(full) == 16 and len(set(full)) == 16  # 2 global batches, the rest dropped
    for world in (2, 4):
        for start in (0, 1):
            parts = []
            for rank in range(world):
                s = distributed.ResumableDistributedSampler(data, 8, num_replicas=world, rank=rank)
                s.set_epoch(3, start_step=start)
                parts.append(list(s))
                assert len(s) == len(parts[-1]) == (2 - start) * 8 // world
            local = 8 // world
            merged = [i for step in range(2 - start) for p in parts for i in p[step * local:(step + 1) * local]]
            assert merged == full[start * 8:]
    s.set_epoch(4)
    assert list(s) != parts[-1]
    with pytest.raises(ValueError, match=r"global batch \(8\) must be divisible by the number of processes \(3\)"):
        distributed.ResumableDistributedSampler(data, 8, num_replicas=3, rank=0)


# ----------------------------------------------------------------------------------- torchrun, end to end
# The demo config made tiny; 16 samples in global batches of 8: 2 steps per epoch.
TINY = ["data.synthetic_train=16", "data.synthetic_val=8", "data.frames=16", "model.hidden_channels=4",
        "model.hidden_dim=16", "model.feature_dim=8", "model.queue_size=16", "model.swap_params=[[2, 3, 1, 2, 1, 1.0]]",
        "train.batch_size=8", "train.knn_interval=1", "train.knn_k=[3]", "train.final_linear_eval=false"]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=240) -> str:
    text = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, text
    return text


def _finish_fail(proc, timeout=240) -> str:
    text = proc.communicate(timeout=timeout)[0]
    assert proc.returncode != 0, text
    return text


def _train_args(out, *extra):
    args = ["-m", "skelemix.train", "--config", "demo.yaml", "--no-progress", "--out", str(out), *extra]
    for item in TINY:
        args += ["--set", item]
    return args


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_torchrun_one_node_several_nodes_resume_and_evaluate(tmp_path):
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    # One node, 2 processes; stops inside epoch 2 (after the distributed kNN monitor of epoch 1).
    text = _finish(_run(_torchrun() + ["--standalone", "--nproc_per_node=2"]
                        + _train_args(one_node, "--epochs", "2", "--max-steps", "3")))
    assert "global batch 8 = 2 processes x 4; base lr 0.0003 (optim.lr as given); BatchNorm per_rank" in text
    assert text.count("stopped after 3 steps") == 1  # rank 0 only
    assert len(_records(one_node, "step")) == 3 and len(_records(one_node, "knn")) == 1
    ckpt = torch.load(one_node / "checkpoints/last.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2 and int(ckpt["model"]["queue_ptr"]) == 8

    # Two "nodes" of one process each (static rendezvous on this machine): the same run, the same numbers.
    port = str(_free_port())
    nodes = [_run(_torchrun() + ["--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                                 f"--master_port={port}"] + _train_args(two_nodes, "--epochs", "2", "--max-steps", "3"))
             for i in range(2)]
    for node in nodes:
        _finish(node)
    assert _records(two_nodes, "step") == _records(one_node, "step")
    assert [r["knn@3"] for r in _records(two_nodes, "knn")] == [r["knn@3"] for r in _records(one_node, "knn")]

    # Resume the 2-process run in a single process: allowed (1 divides the global batch of 8), and said.
    text = _finish(_run([sys.executable, "-m", "skelemix.train", "--out", str(one_node), "--no-progress",
                         "--resume"]))
    assert "written by 2 process(es) and this run has 1" in text and "resumed from" in text
    assert [r["global_step"] for r in _records(one_node, "step")] == [1, 2, 3, 4]
    # ... but not with 3 processes.
    bad = _finish_fail(_run(_torchrun() + ["--standalone", "--nproc_per_node=3"] + _train_args(tmp_path / "bad")))
    assert "train.batch_size (8) is the global batch and must be divisible by the number of processes (3)" in bad

    # kNN evaluation under torchrun: features gathered from both processes give the one-process scores.
    ckpt_path = str(one_node / "checkpoints/last.pt")
    _finish(_run(_torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "skelemix.evaluate", "knn",
                                "--checkpoint", ckpt_path, "--k", "3", "--no-plots", "--out", str(tmp_path / "knn2")]))
    _finish(_run([sys.executable, "-m", "skelemix.evaluate", "knn", "--checkpoint", ckpt_path, "--k", "3",
                  "--no-plots", "--out", str(tmp_path / "knn1")]))
    np.testing.assert_array_equal(np.load(tmp_path / "knn2/scores.npy"), np.load(tmp_path / "knn1/scores.npy"))



# ----------------------------------------------------------------------------------- config and resume rules
def test_dist_config_and_lr_rule_are_checked_and_described():
    from skelemix.config import ConfigError, describe_batch_and_lr
    from skelemix.train import lr_at

    with pytest.raises(ConfigError, match=r"dist.bn: expected one of per_rank, sync, shuffle; got 'global'"):
        build_config({}, ["dist.bn=global"])
    with pytest.raises(ConfigError, match=r"optim.lr_scaling: expected one of none, linear"):
        build_config({}, ["optim.lr_scaling=sqrt"])
    c = build_config({}, ["optim.lr=0.1", "train.batch_size=256", "model.queue_size=32768"])
    assert lr_at(c, 1) == 0.1
    assert describe_batch_and_lr(c, 4) == ("global batch 256 = 4 processes x 64; base lr 0.1 (optim.lr as given); "
                                           "BatchNorm per_rank")
    c = build_config({}, ["optim.lr=0.1", "train.batch_size=256", "model.queue_size=32768", "optim.lr_scaling=linear",
                          "optim.lr_reference_batch=128", "optim.steps=[5]"])
    assert lr_at(c, 1) == pytest.approx(0.2) and lr_at(c, 6) == pytest.approx(0.02)
    assert "base lr 0.2 (linear scaling: optim.lr 0.1 x 256 / 128)" in describe_batch_and_lr(c, 1)


def test_resume_with_another_global_batch_only_where_the_queue_allows(tmp_path, capsys):
    from skelemix.train import main

    args = ["--config", "demo.yaml", "--no-progress", "--out", str(tmp_path)]
    for item in TINY:
        args += ["--set", item]
    assert main(args + ["--epochs", "2", "--max-steps", "1"]) == 0  # stops inside epoch 1
    assert main(args + ["--epochs", "2", "--resume", "--set", "train.batch_size=16"]) == 2
    assert ("cannot resume" in capsys.readouterr().err)
    assert main(args + ["--epochs", "2", "--max-steps", "2", "--resume"]) == 0  # now at the end of epoch 1
    assert main(args + ["--epochs", "2", "--resume", "--set", "train.batch_size=16"]) == 0
    assert "the global batch changes from 8 to 16 at this epoch boundary" in capsys.readouterr().out


@pytest.mark.parametrize("bn", ["sync", "shuffle"])
def test_torchrun_with_synced_or_shuffled_batchnorm(tmp_path, bn):
    text = _finish(_run(_torchrun() + ["--standalone", "--nproc_per_node=2"]
                        + _train_args(tmp_path, "--max-steps", "2", "--set", f"dist.bn={bn}")))
    assert f"global batch 8 = 2 processes x 4; base lr 0.0003 (optim.lr as given); BatchNorm {bn}" in text
    steps = _records(tmp_path, "step")
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    ckpt = torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)
    assert ckpt["config"]["dist"]["bn"] == bn and int(ckpt["model"]["queue_ptr"]) == 0  # 2 x 8 keys, queue of 16
