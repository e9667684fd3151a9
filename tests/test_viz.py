"""Pictures: ``python -m skelemix.viz mix``, training curves, confusion matrices and embeddings."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from skelemix import viz
from skelemix.graph import NTU



def test_mix_writes_a_png_grid_and_a_gif(tmp_path, capsys):
    assert viz.main(["mix", "--out", str(tmp_path), "--length", "16", "--frames", "4", "--index", "2"]) == 0
    with Image.open(tmp_path / "mix.png") as png:
        assert png.width > 0 and png.height > 0
    with Image.open(tmp_path / "mix.gif") as gif:
        assert gif.n_frames == 16 and gif.width > 0
    assert "sample 2" in capsys.readouterr().out


def test_mix_example_pastes_the_partner_inside_the_region():
    g = torch.Generator().manual_seed(0)
    x, p = torch.randn(3, 32, 25, 2, generator=g), torch.randn(3, 32, 25, 2, generator=g)
    for seed in range(5):
        ex = viz.mix_example(x, p, seed=seed)
        joints, (t0, t1) = torch.from_numpy(ex["joints"]), ex["window"]
        inside = torch.zeros(32, 25, dtype=torch.bool)
        inside[t0:t1, joints] = True
        expected = torch.where(inside[None, :, :, None], p, x)
        torch.testing.assert_close(ex["mixed"], expected, rtol=0, atol=0)
        assert ex["tem_range"] == (4, 6) and 16 <= t1 - t0 <= 24 and t0 % 4 == 0
        assert 2 <= len(ex["parts"]) <= 3  # the region is a union of 2-3 whole body parts
        parts = [set(NTU.body_parts[NTU.part_names.index(name)]) for name in ex["parts"]]
        assert set(joints.nonzero().flatten().tolist()) == set().union(*parts)


def test_scaled_temporal_range():
    assert viz.scaled_tem_range(64) == (7, 11)  # the released setting
    assert viz.scaled_tem_range(16) == (2, 3)
    assert viz.scaled_tem_range(4) == (1, 1)
    with pytest.raises(ValueError, match="no whole block"):
        viz.scaled_tem_range(3)


def test_mix_errors(tmp_path, capsys):
    assert viz.main(["mix", "--out", str(tmp_path), "--length", "16", "--index", "999"]) == 2
    assert "outside the 32 samples" in capsys.readouterr().err
    assert viz.main(["mix", "--out", str(tmp_path), "--data", str(tmp_path / "nowhere")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def write_metrics(path, knn=True, torn=True):
    records = [{"kind": "step", "epoch": 1, "global_step": 1, "loss": 99.0}]
    for e in range(1, 6):
        records.append({"kind": "epoch", "epoch": e, "global_step": 10 * e, "loss": 10.0 - e, "loss_ins": 5.0 - e / 2,
                        "loss_p": float("nan") if e == 1 else 2.5, "loss_c": 2.5, "lr": 0.1})
        if knn and e % 2 == 0:
            records.append({"kind": "knn", "epoch": e, "knn@10": 20.0 + e, "knn@20": 21.0 + e, "knn@40": 19.0 + e})
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"kind": "epoch", "ep' if torn else ""))  # a run killed mid-write
    return path


def test_plot_curves(tmp_path):
    written = viz.plot_curves(write_metrics(tmp_path / "metrics.jsonl"), tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "knn.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.width > 0 and im.height > 0
    written = viz.plot_curves(write_metrics(tmp_path / "m2.jsonl", knn=False, torn=False), tmp_path / "p2")
    assert [p.name for p in written] == ["loss.png"]
    assert viz.main(["curves", str(tmp_path / "m2.jsonl"), "--out", str(tmp_path / "p3")]) == 0
    assert (tmp_path / "p3" / "loss.png").is_file()
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        viz.plot_curves(tmp_path / "missing.jsonl", tmp_path)


def test_compare_draws_several_runs_on_one_picture(tmp_path):
    a, b = write_metrics(tmp_path / "a.jsonl"), write_metrics(tmp_path / "b.jsonl", knn=False, torn=False)
    out = tmp_path / "cmp" / "compare.png"
    assert viz.main(["compare", f"mixed={a}", f"mixed={a}", f"plain={b}", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width > 500 and im.height > 200
    assert viz.main(["compare", str(a), "--out", str(out)]) == 2  # no label: one line of error, exit 2
    assert viz.main(["compare", f"x={tmp_path / 'missing.jsonl'}", "--out", str(out)]) == 2


@pytest.mark.parametrize("num_classes", [3, 60])
def test_plot_confusion_and_embedding(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, 200)
    confusion = np.bincount(labels * num_classes + rng.integers(0, num_classes, 200),
                            minlength=num_classes ** 2).reshape(num_classes, num_classes)
    classes = [f"class {i}" for i in range(num_classes)]
    assert viz.plot_confusion(confusion, classes, tmp_path / "c.png").is_file()
    feats = rng.normal(size=(200, 16)) + labels[:, None]
    assert viz.plot_embedding(feats, labels, classes, tmp_path / "e.png").is_file()
    with pytest.raises(ValueError, match="confusion must be"):
        viz.plot_confusion(confusion[:2], classes, tmp_path / "bad.png")


def test_pca_finds_the_direction_of_largest_variance():
    rng = np.random.default_rng(0)
    direction = np.array([3.0, 4.0, 0.0]) / 5
    x = rng.normal(size=(500, 1)) * 10 * direction + rng.normal(size=(500, 3)) * 0.1 + 7
    xy = viz.pca_2d(x)
    assert xy.shape == (500, 2)
    centred = x - x.mean(0)
    assert abs(np.corrcoef(xy[:, 0], centred @ direction)[0, 1]) > 0.999
    assert xy[:, 0].var() > 100 * xy[:, 1].var()


def test_torn_and_bad_metrics_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "epoch", "epoch": 1, "loss": 1.0}) + '\n{"kind": "ep')
    assert viz.read_metrics(path) == [{"kind": "epoch", "epoch": 1, "loss": 1.0}]
    assert capsys.readouterr().err == f"note: {path}:2: dropped a torn last record (the run stopped while writing it)\n"
    path.write_text('{"kind": "ep\n' + json.dumps({"kind": "epoch", "epoch": 1}) + "\n")
    assert viz.main(["curves", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:1: not a JSON record: ")
    path.write_text("[1, 2]\n")
    assert viz.main(["curves", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}:1: expected a JSON object, got list\n"
