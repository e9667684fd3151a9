import errno
import os

import pytest
import torch

from bench.official_style import OfficialModel  # on the path through conftest.py
from skelemix.checkpoint import (CheckpointError, export_official, load_checkpoint, load_official, reading_part,
                                 remove_temporaries, require_parts, save_checkpoint)
from skelemix.models import STGCN, SkeleMixCLR
from skelemix.testing import perturb_state


def small_encoder(**kw):
    return STGCN(hidden_channels=4, hidden_dim=16, **kw)


def test_atomic_save_and_safe_load(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"step": 3, "w": torch.arange(4)}, path)
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind

    class Boom:
        def __reduce__(self):
            raise RuntimeError("interrupted mid-write")

    with pytest.raises(RuntimeError, match="interrupted"):
        save_checkpoint({"step": 4, "bad": Boom()}, path)
    assert load_checkpoint(path)["step"] == 3  # the previous checkpoint survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_refuses_code_in_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*evil.pt safely \(weights_only=True\): Trying "
                                              r"to load unsupported GLOBAL posix.system whose module posix is blocked.$"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unloadable_files_are_named(tmp_path):
    good = save_checkpoint({"w": torch.arange(100)}, tmp_path / "good.pt").read_bytes()
    for name, data in (("truncated.pt", good[: len(good) // 2]), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"cannot load checkpoint {tmp_path / name}: the file is damaged, "
                                                  r"truncated or not a torch checkpoint \(.+\)$"):
            load_checkpoint(tmp_path / name)
    (tmp_path / "text.pt").write_bytes(b"not a zip\n")  # read as a legacy pickle: its first byte is no opcode
    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {tmp_path / 'text.pt'} safely "
                                              r"\(weights_only=True\): Unsupported operand 110$"):
        load_checkpoint(tmp_path / "text.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*folder.pt"):
        load_checkpoint(tmp_path / "folder.pt")


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1}, tmp_path / "last.pt")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as info:
        save_checkpoint({"step": 2}, path)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(path))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_temporaries_of_killed_saves_are_removed(tmp_path):
    orphans = [tmp_path / name for name in (".last.pt.abc12345.tmp", ".epoch5.pt.x_y_z_1.tmp")]
    keep = [tmp_path / name for name in ("last.pt", "notes.tmp", ".hidden.tmp", ".last.pt.keep")]
    for p in orphans + keep:
        p.write_bytes(b"x")
    save_checkpoint({"step": 1}, tmp_path / "last.pt")  # removes the temporaries of last.pt only
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep + orphans[1:])
    remove_temporaries(tmp_path)  # of every checkpoint (what the trainer does when it starts)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def test_missing_and_unfit_parts_are_named(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(CheckpointError, match=r"c.pt: cannot resume: the checkpoint has no 'optimizer', 'rng' \(found "
                                              r"keys \['model'\]\)"):
        require_parts({"model": {}}, path, ("model", "optimizer", "rng"), "resume")
    with pytest.raises(CheckpointError, match="c.pt: cannot resume: expected a dict, found list"):
        require_parts([1], path, ("model",), "resume")
    with pytest.raises(CheckpointError, match="c.pt: its 'model' does not fit this run: no key 'queue_ptr'"):
        with reading_part(path, "model"):
            {}["queue_ptr"]
    with pytest.raises(CheckpointError, match=r"c.pt: its 'model' does not fit this run: Error\(s\) in loading"):
        with reading_part(path, "model"):
            torch.nn.Linear(2, 2).load_state_dict({"weight": torch.zeros(3, 3)})
    with pytest.raises(ZeroDivisionError):  # a bug is not the file's fault
        with reading_part(path, "model"):
            1 / 0


@pytest.mark.parametrize("mlp", [False, True])
def test_official_encoder_weights_give_the_official_outputs(mlp):
    torch.manual_seed(0)
    ours = small_encoder(num_class=10, head="mlp" if mlp else "linear")
    official = OfficialModel(ours.A, hc=4, hd=16, num_class=10, mlp=mlp)
    perturb_state(official)
    sd = {"encoder_q." + k: v for k, v in official.state_dict().items()}
    ours.load_state_dict(load_official(sd))
    ours.eval(), official.eval()
    x = torch.randn(3, 3, 16, 25, 2)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-6)
    mask = torch.zeros(4, 25, dtype=torch.bool)
    mask[1:3, 5:12] = True
    for a, b in zip(ours(x, mask), official(x, mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # ...and back: exported weights load strictly into the official structure.
    back = OfficialModel(ours.A, hc=4, hd=16, num_class=10, mlp=mlp)
    exported = export_official(ours)
    assert all(k.startswith("encoder_q.") for k in exported)
    back.load_state_dict({k[len("encoder_q."):]: v for k, v in exported.items()})
    torch.testing.assert_close(back.eval()(x), official(x), rtol=1e-5, atol=1e-6)


def test_official_pretraining_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SkeleMixCLR(encoder=dict(hidden_channels=4, hidden_dim=16), feature_dim=8, queue_size=32)
    perturb_state(model)
    official_keys = set()
    for prefix in ("encoder_q.", "encoder_k."):
        ref = OfficialModel(model.encoder_q.A, hc=4, hd=16, num_class=8, mlp=True)
        official_keys |= {prefix + k for k in ref.state_dict()}
    exported = export_official(model)
    assert set(exported) == official_keys | {"queue", "queue_ptr"}
    # As the official code saves it (DataParallel prefix, the v1 label buffer), through a file.
    path = tmp_path / "epoch300_model.pt"
    torch.save({"module." + k: v for k, v in exported.items()} | {"module.queue_label": torch.zeros(32)}, path)
    again = SkeleMixCLR(encoder=dict(hidden_channels=4, hidden_dim=16), feature_dim=8, queue_size=32)
    again.load_state_dict(load_official(path))
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_official_rejects_non_state_dicts(tmp_path):
    with pytest.raises(ValueError, match="state dict"):
        load_official({"epoch": 3})
    with pytest.raises(ValueError, match="unexpected key 'fc.weight'"):
        load_official({"fc.weight": torch.zeros(1)})
