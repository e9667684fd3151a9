"""``python -m skelemix.evaluate`` end to end on a tiny checkpoint, and the evaluation math it relies on."""
import json
import math

import numpy as np
import pytest
import torch

from skelemix import evaluate
from skelemix.checkpoint import PRETRAIN_FORMAT, export_official, load_checkpoint, save_checkpoint
from skelemix.config import build_config, make_pretrain_model
from skelemix.data import load_splits
from skelemix.finetune import FinetuneOptions, Schedule
from skelemix.probe import balanced_subset, knn_predict, knn_scores, topk_accuracy, train_linear
from skelemix.testing import perturb_state

TINY = {
    "data": {"root": "synthetic", "synthetic_train": 24, "synthetic_val": 12, "frames": 16},
    "model": {"hidden_channels": 4, "hidden_dim": 16, "feature_dim": 8, "queue_size": 32,
              "swap_params": [[2, 3, 1, 2, 1, 1.0]]},
    "train": {"batch_size": 8, "workers": 0, "seed": 0},
}
# The same architecture and data for checkpoints that carry no config (official ones, 'none').
TINY_SET = ["--set", "model.hidden_channels=4", "--set", "model.hidden_dim=16", "--set", "model.feature_dim=8",
            "--set", "data.synthetic_train=24", "--set", "data.synthetic_val=12", "--set", "data.frames=16"]
NUM_CLASSES, VAL = 11, 12



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A pretraining checkpoint as the trainer writes it, with weights and BN statistics moved off their
    initial values (so a weight that is silently not loaded shows), and the same model exported in the
    official format."""
    root = tmp_path_factory.mktemp("pretrain")
    config = build_config(TINY)
    torch.manual_seed(0)
    model = make_pretrain_model(config)
    perturb_state(model)
    path = save_checkpoint({"format": PRETRAIN_FORMAT, "config": config.to_dict(),
                            "model": model.state_dict(), "epoch": 7}, root / "run" / "checkpoints" / "last.pt")
    official = save_checkpoint(export_official(model), root / "official" / "epoch300_model.pt")
    return {"path": path, "official": official, "model": model, "root": root}


def run(*argv):
    assert evaluate.main([str(a) for a in argv]) == 0


def read(out):
    return json.loads((out / "results.json").read_text())


def check_outputs(out, result, plots=True):
    for name in ["results.json", "scores.npy", "labels.npy"] + (["confusion.png", "embedding.png"] if plots else []):
        assert (out / name).is_file(), name
    scores, labels = np.load(out / "scores.npy"), np.load(out / "labels.npy")
    assert scores.shape == (VAL, NUM_CLASSES) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(1), 1, rtol=1e-5)
    _, val = load_splits(build_config(TINY).data)
    np.testing.assert_array_equal(labels, val.targets)
    assert result["num_classes"] == NUM_CLASSES and result["val_samples"] == VAL


def check_protocols(result, epochs):
    p = result["protocols"]
    for name in ("paper", "clean"):
        assert 0 <= p[name]["top1"] <= p[name]["top5"] <= 100
    assert p["paper"]["top1"] >= p["clean"]["top1"]
    assert p["paper"]["top1"] == max(h["top1"] for h in result["history"])
    assert p["clean"]["epoch"] == epochs and "model selection on the test set" in p["paper"]["description"]


# ----------------------------------------------------------------------------------------------- linear
def test_linear_trains_only_the_classifier_on_the_loaded_encoder(ckpt):
    run("linear", "--checkpoint", ckpt["path"], "--epochs", 3, "--eval-interval", 2, "--lr", 0.5)
    out = ckpt["path"].parent.parent / "eval_linear"  # the default: next to the checkpoint folder
    result = read(out)
    check_outputs(out, result)
    check_protocols(result, epochs=3)
    assert [h["epoch"] for h in result["history"]] == [2, 3]
    assert result["mode"] == "linear" and result["checkpoint_kind"] == "skelemix" and result["view"] == "joint"
    assert result["settings"]["lr"] == 0.5 and result["settings"]["milestones"] == [80]
    # The evaluated backbone is encoder_q exactly, BN statistics and edge importances included; fc is new.
    saved = load_checkpoint(out / "classifier.pt")["model"]
    pretrained = {k[len("encoder_q."):]: v for k, v in ckpt["model"].state_dict().items()
                  if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")}
    assert set(saved) - set(pretrained) == {"fc.weight", "fc.bias"}
    for key, value in pretrained.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)
    assert saved["fc.weight"].shape == (NUM_CLASSES, 16)


# -------------------------------------------------------------------------------------------------- knn
@pytest.mark.parametrize("extra, dim", [([], 8), (["--features", "backbone"], 16), (["--augment", "--k", 3], 8)])
def test_knn(ckpt, tmp_path, extra, dim):
    run("knn", "--checkpoint", ckpt["path"], "--out", tmp_path, "--no-plots", *extra)
    result = read(tmp_path)
    check_outputs(tmp_path, result, plots=False)
    ks = ["3"] if "--k" in extra else ["10", "20", "40"]
    assert list(result["knn"]) == ks
    for k in ks:
        assert 0 <= result["knn"][k]["top1"] <= result["knn"][k]["top5"] <= 100
    assert result["settings"]["feature_dim"] == dim and result["settings"]["augment"] == ("--augment" in extra)


# ------------------------------------------------------------------------------------- finetune and semi
def test_finetune_trains_everything_and_reports_both_protocols(ckpt, tmp_path):
    run("finetune", "--checkpoint", ckpt["path"], "--out", tmp_path, "--epochs", 2, "--eval-interval", 1,
        "--batch-size", 8, "--clip-grad-norm", 5)
    result = read(tmp_path)
    check_outputs(tmp_path, result)
    check_protocols(result, epochs=2)
    s = result["settings"]
    assert (s["lr"], s["nesterov"], s["weight_decay"], s["warmup"], s["milestones"]) == (0.1, True, 1e-4, 10,
                                                                                         [50, 70, 90])
    saved = load_checkpoint(tmp_path / "classifier.pt")["model"]
    before = ckpt["model"].state_dict()
    assert not torch.equal(saved["blocks.0.gcn.conv.weight"], before["encoder_q.blocks.0.gcn.conv.weight"])
    # Train mode (the default) updates the BN statistics.
    assert not torch.equal(saved["data_bn.running_mean"], before["encoder_q.data_bn.running_mean"])


def test_official_eval_mode_keeps_the_pretrained_bn_statistics(ckpt, tmp_path):
    run("finetune", "--checkpoint", ckpt["path"], "--out", tmp_path, "--epochs", 1, "--batch-size", 8,
        "--official-eval-mode", "--no-plots")
    saved = load_checkpoint(tmp_path / "classifier.pt")["model"]
    before = ckpt["model"].state_dict()
    torch.testing.assert_close(saved["data_bn.running_mean"], before["encoder_q.data_bn.running_mean"])
    assert not torch.equal(saved["blocks.0.gcn.conv.weight"], before["encoder_q.blocks.0.gcn.conv.weight"])


def test_gradient_clipping_sees_the_gradients(monkeypatch):
    """The official code clipped before backward (no gradients yet, a no-op); ours clips after it."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        seen.append(all(p.grad is not None for p in params))
        total = real(params, max_norm)
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item() <= max_norm + 1e-4)
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    config = build_config(TINY)
    train, val = load_splits(config.data)
    encoder = evaluate.build_encoder(evaluate.Pretrained("none", None, config, None), NUM_CLASSES)
    schedule = Schedule(lr=0.1, epochs=1, milestones=(), batch_size=12)
    evaluate.finetune(encoder, train, val, schedule, FinetuneOptions(clip_grad_norm=1e-3), device=torch.device("cpu"),
                      view="joint", layout="ntu-rgb+d", log=lambda m: None)
    assert seen and all(seen)


@pytest.mark.parametrize("fraction, lr, wd, milestones", [(0.1, 0.1, 1e-4, [80]), (0.01, 0.05, 0.0, [40])])
def test_semi_uses_a_balanced_subset_and_the_released_settings(ckpt, tmp_path, fraction, lr, wd, milestones):
    run("semi", "--checkpoint", ckpt["path"], "--out", tmp_path, "--fraction", fraction, "--epochs", 1,
        "--batch-size", 8, "--no-plots")
    result = read(tmp_path)
    check_outputs(tmp_path, result, plots=False)
    s = result["settings"]
    assert (s["lr"], s["weight_decay"], s["milestones"], s["nesterov"], s["warmup"]) == (lr, wd, milestones,
                                                                                         False, 0)
    subset = np.load(tmp_path / "subset_indices.npy")
    train, _ = load_splits(build_config(TINY).data)
    np.testing.assert_array_equal(subset, balanced_subset(train.targets, fraction, seed=0))
    assert result["subset"]["per_class"] == [1] * NUM_CLASSES  # about 2 samples per class: round down, at least 1


# ----------------------------------------------------------------------------------- checkpoint formats
@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_checkpoint_loads_the_same_encoder(ckpt, tmp_path, prefix):
    sd = {prefix + k: v for k, v in load_checkpoint(ckpt["official"]).items()}
    path = save_checkpoint(sd, tmp_path / "official.pt")
    overrides = [o for o in TINY_SET if o != "--set"]
    official = evaluate.load_pretrained(path, overrides=overrides)
    ours = evaluate.load_pretrained(ckpt["path"])
    assert official.kind == "official" and ours.kind == "skelemix"
    a = evaluate.build_encoder(official, NUM_CLASSES).state_dict()
    b = evaluate.build_encoder(ours, NUM_CLASSES).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert evaluate.projection_head(official.encoder_state) == ("mlp", 8)


def test_official_checkpoint_through_the_cli(ckpt, tmp_path):
    run("knn", "--checkpoint", ckpt["official"], "--out", tmp_path, "--no-plots", "--k", 5, *TINY_SET)
    assert read(tmp_path)["checkpoint_kind"] == "official"


def test_random_init_baseline(tmp_path):
    run("linear", "--checkpoint", "none", "--out", tmp_path, "--epochs", 1, "--no-plots", *TINY_SET)
    result = read(tmp_path)
    assert result["checkpoint"] == "none" and result["checkpoint_kind"] == "none"


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors(ckpt, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        evaluate.load_pretrained(tmp_path / "missing.pt")
    assert evaluate.main(["linear", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err

    save_checkpoint({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"neither .* found a dict with keys \['epoch', 'optimizer'\]"):
        evaluate.load_pretrained(tmp_path / "other.pt")
    save_checkpoint({"format": "skelemix-prepared/1"}, tmp_path / "fmt.pt")
    with pytest.raises(ValueError, match="format 'skelemix-prepared/1' is neither a pretraining checkpoint"):
        evaluate.load_pretrained(tmp_path / "fmt.pt")
    with pytest.raises(ValueError, match="carries its own config"):
        evaluate.load_pretrained(ckpt["path"], config_file="demo.yaml")

    # The official weights with the paper's architecture: the message says what the weights look like.
    pre = evaluate.load_pretrained(ckpt["official"])
    with pytest.raises(ValueError, match=r"do not fit .* model.hidden_channels=4, model.hidden_dim=16"):
        evaluate.build_encoder(pre, NUM_CLASSES)

    with pytest.raises(FileNotFoundError, match="data folder not found: .*nowhere"):
        evaluate.with_data(build_config(TINY), str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        evaluate.with_data(build_config(TINY), str(tmp_path / "empty"))

    train, val = load_splits(build_config(TINY).data)
    val.meta = {"classes": val.meta["classes"][:5]}
    with pytest.raises(ValueError, match="mismatched num_classes: the train split has 11 classes and the val "
                                         "split 5"):
        evaluate.class_names(train, val)


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 cut short", "cannot load checkpoint {path}: the file is damaged, truncated or not a torch "
                              "checkpoint ("),
    (b"", "cannot load checkpoint {path}: the file is damaged, truncated or not a torch checkpoint (EOFError)"),
    ({"format": "skelemix-pretrain/1", "model": {}}, "{path}: cannot evaluate it: the checkpoint has no 'config' "
                                                     "(found keys ['format', 'model'])"),
    ({"format": "skelemix-pretrain/1", "config": {}, "model": [1, 2]}, "{path}: its 'model' is list, not a state dict"),
    ({"format": "skelemix-pretrain/1", "config": [1], "model": {}}, "the config: expected a mapping of sections, got "
                                                                    "list [1]"),
])
def test_unusable_checkpoints_end_in_one_line(ckpt, tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_checkpoint(content, path)
    assert evaluate.main(["knn", "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: " + message.format(path=path))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- ensemble
def fake_result(path, scores, labels, view):
    path.mkdir(parents=True)
    np.save(path / "scores.npy", np.asarray(scores, dtype=np.float32))
    np.save(path / "labels.npy", np.asarray(labels, dtype=np.int64))
    (path / "results.json").write_text(json.dumps({"mode": "linear", "view": view, "classes": ["a", "b", "c"]}))
    return path


def test_ensemble(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(3), size=20)
    labels = rng.integers(0, 3, 20)
    a = fake_result(tmp_path / "joint", scores, labels, "joint")
    b = fake_result(tmp_path / "motion", scores, labels, "motion")
    run("ensemble", a, b, "--out", tmp_path / "ens")
    result = read(tmp_path / "ens")
    assert [s["view"] for s in result["streams"]] == ["joint", "motion"]
    for s in result["streams"]:  # identical streams: the ensemble is each of them
        assert (s["top1"], s["top5"]) == (result["ensemble"]["top1"], result["ensemble"]["top5"])
    np.testing.assert_allclose(np.load(tmp_path / "ens" / "scores.npy"), scores, rtol=1e-6)
    assert (tmp_path / "ens" / "confusion.png").is_file()

    # Complementary streams: the average is right where each is right half the time.
    s1 = np.array([[0.9, 0.1, 0], [0.6, 0.4, 0]])
    s2 = np.array([[0.4, 0.6, 0], [0.1, 0.9, 0]])
    c = fake_result(tmp_path / "c", s1, [0, 1], "joint")
    d = fake_result(tmp_path / "d", s2, [0, 1], "bone")
    result = evaluate.ensemble([c, d], tmp_path / "cd", plots=False)
    assert [s["top1"] for s in result["streams"]] == [50.0, 50.0] and result["ensemble"]["top1"] == 100.0

    e = fake_result(tmp_path / "e", s1, [1, 1], "joint")
    with pytest.raises(ValueError, match="label arrays differ: .* disagrees .* on 1 of 2 samples"):
        evaluate.ensemble([c, e], tmp_path / "x", plots=False)
    f = fake_result(tmp_path / "f", np.ones((2, 4)) / 4, [0, 1], "joint")
    with pytest.raises(ValueError, match="mismatched num_classes: .* 3 classes and .* 4"):
        evaluate.ensemble([c, f], tmp_path / "x", plots=False)
    with pytest.raises(FileNotFoundError, match="not an evaluation output folder: scores.npy is missing"):
        evaluate.ensemble([c, tmp_path / "ens" / ".."], tmp_path / "x", plots=False)


# ------------------------------------------------------------------------------------------------- math
def test_knn_weighting_differs_from_a_majority_vote():
    """Two very close neighbours of class 1 outweigh three farther ones of class 0 under exp(sim / t)."""
    angles = torch.tensor([0.05, -0.05, 0.6, -0.6, 0.65])
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([1, 1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    majority = torch.bincount(labels, minlength=2).argmax().item()
    assert majority == 0
    assert knn_predict(bank, labels, query, k=5, num_classes=2, t=0.1).item() == 1
    assert knn_predict(bank, labels, query, k=5, num_classes=2, t=100.0).item() == 0  # flat weights: majority
    votes = knn_scores(bank * 3, labels, query * 2, k=5, num_classes=2, t=0.1)  # cosine: scale-free
    sim = angles.cos()
    expected = torch.stack([(sim[2:] / 0.1).exp().sum(), (sim[:2] / 0.1).exp().sum()])
    torch.testing.assert_close(votes[0], expected)
    assert knn_predict(bank, labels, query, k=3, num_classes=2, t=0.1).item() == 1  # top-3: 1, 1, 0


def test_balanced_subset():
    labels = np.repeat([0, 1, 2, 3], [10, 20, 30, 3])
    subset = balanced_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[subset]).tolist() == [1, 2, 3, 1]  # round(0.3) = 0 -> at least one
    assert np.all(np.diff(subset) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(subset, balanced_subset(labels, 0.1, seed=0))
    assert any(not np.array_equal(subset, balanced_subset(labels, 0.1, seed=s)) for s in range(1, 4))
    assert np.bincount(labels[balanced_subset(labels, 0.5, seed=1)]).tolist() == [5, 10, 15, 2]
    with pytest.raises(ValueError, match="fraction must be in"):
        balanced_subset(labels, 0.0)


def test_train_linear_best_is_at_least_last():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 2
    y = torch.randint(0, 4, (200,), generator=g)
    x = centres[y] + torch.randn(200, 6, generator=g)
    r = train_linear(x[:120], y[:120], x[120:], y[120:], 4, epochs=12, lr=0.5, milestones=(8,), batch_size=32,
                     eval_interval=5)
    assert [h["epoch"] for h in r["history"]] == [5, 10, 12]
    assert r["best"] == max(h["top1"] for h in r["history"]) >= r["last"] == r["history"][-1]["top1"]
    assert r["last"] > 50 and r["logits"].shape == (80, 4)


def test_topk_accuracy_and_schedule():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2, 5)) == {1: pytest.approx(100 / 3),
                                                                          2: pytest.approx(200 / 3), 5: 100.0}
    lr = [Schedule(lr=0.1, epochs=110, milestones=(50, 70, 90), warmup=10).lr_at(e) for e in (1, 9, 10, 50, 51, 71, 91)]
    assert lr == pytest.approx([0.01, 0.09, 0.1, 0.1, 0.01, 0.001, 0.0001])
    history = [{"epoch": 5, "top1": 50, "top5": 80}, {"epoch": 10, "top1": 60, "top5": 85},
               {"epoch": 15, "top1": 60, "top5": 90}, {"epoch": 20, "top1": 55, "top5": 95}]
    p = evaluate.protocols(history)
    assert (p["paper"]["epoch"], p["paper"]["top1"], p["clean"]["top1"]) == (10, 60, 55)
    assert math.isclose(p["clean"]["top5"], 95)


def test_official_classifier_checkpoint_and_prepared_data(ckpt, tmp_path):
    """An official linear-eval/fine-tune state dict (encoder_q with a Linear fc) is accepted too, and a prepared
    dataset folder works with its own frame count and another view."""
    from skelemix.data import write_synthetic
    from skelemix.models import STGCN

    torch.manual_seed(0)
    classifier = STGCN(hidden_channels=4, hidden_dim=16, num_class=60)
    path = save_checkpoint(export_official(classifier), tmp_path / "linear_eval_model.pt")
    pre = evaluate.load_pretrained(path, overrides=[o for o in TINY_SET if o != "--set"])
    assert pre.kind == "official" and evaluate.projection_head(pre.encoder_state) == ("linear", 60)
    encoder = evaluate.build_encoder(pre, NUM_CLASSES)  # the 60-class fc is dropped, an 11-class one is made
    torch.testing.assert_close(encoder.blocks[3].tcn[2].weight, classifier.blocks[3].tcn[2].weight)
    assert encoder.fc.out_features == NUM_CLASSES

    write_synthetic(tmp_path / "prepared", train_size=24, val_size=12, frames=20)
    run("knn", "--checkpoint", ckpt["path"], "--data", tmp_path / "prepared", "--view", "bone", "--k", 5,
        "--out", tmp_path / "out", "--no-plots")
    result = read(tmp_path / "out")
    assert result["view"] == "bone" and result["data"] == str(tmp_path / "prepared") and result["val_samples"] == 12
