"""Layouts from YAML files, 2-D input, and every command on every shipped layout.

The helpers :func:`layout_data` and :func:`write_layout_data` make small prepared datasets of any layout; the
tests of ``skelemix.embed`` use them too.
"""
import json
import pickle
import re

import numpy as np
import pytest
import torch
import yaml

from skelemix import evaluate, export, train, viz
from skelemix.augment import draw_augment, shear
from skelemix.config import ConfigError, build_config, with_data_input
from skelemix.data import PreparedDataset, nwucla, write_meta, write_split
from skelemix.data.errors import DataFormatError
from skelemix.data.__main__ import main as data_main
from skelemix.data.preprocess import preprocess
from skelemix.embed import main as embed_main
from skelemix.graph import (COCO, LAYOUT_DIR, LAYOUTS, NTU, NW_UCLA, Graph, LayoutError, get_layout, layout_value,
                            load_layout)

HAVE_ONNX = all(export._importable(m) for m in ("onnx", "onnxscript", "onnxruntime"))
ONNX_REASON = "needs the export extra: pip install onnx onnxscript onnxruntime"
TINY = ["--set", "model.hidden_channels=4", "--set", "model.hidden_dim=16", "--set", "model.feature_dim=8",
        "--set", "model.queue_size=16", "--set", "model.swap_params=[[2, 3, 1, 2, 1, 1.0]]",
        "--set", "train.batch_size=8", "--set", "train.workers=0", "--set", "train.knn_interval=0",
        "--set", "train.final_linear_eval=false", "--set", "train.save_interval=1", "--epochs", "1",
        "--no-progress"]


def layout_data(layout, n, frames=16, channels="x,y,z", bodies=1, seed=0):
    """``(data (n, C, frames, V, bodies), labels (n,))``: a fixed random pose per class whose joints swing
    with the class's frequency, plus noise; a score channel lies in (0, 1]."""
    rng = np.random.default_rng(seed)
    V, C = get_layout(layout).num_joints, len(channels.split(","))
    labels = np.arange(n) % 3
    poses = rng.normal(size=(3, C, 1, V, 1))
    t = np.linspace(0, 2 * np.pi, frames)[None, None, :, None, None]
    swing = np.sin(t * (1 + labels[:, None, None, None, None]) + rng.uniform(0, 6, size=(n, 1, 1, V, 1)))
    data = poses[labels] + 0.3 * swing + 0.05 * rng.normal(size=(n, C, frames, V, bodies))
    if channels == "x,y,score":
        data[:, 2] = rng.uniform(0.2, 1.0, size=(n, frames, V, bodies))
    return data.astype(np.float32), labels.astype(np.int64)


def write_layout_data(root, layout, train=16, val=8, frames=16, channels="x,y,z", bodies=1):
    """A prepared dataset of ``layout`` at ``root`` (classes a, b, c; splits train and val)."""
    for offset, (split, size) in enumerate((("train", train), ("val", val))):
        data, labels = layout_data(layout, size, frames, channels, bodies, seed=offset)
        write_split(root, split, data, labels, [f"{split}_{i:03d}" for i in range(size)])
    write_meta(root, dataset="test", layout=layout_value(layout), classes=["a", "b", "c"], frames=frames,
               bodies=bodies, splits={"train": train, "val": val}, channels=channels.split(","),
               options={"frames": frames})
    return root


# ---------------------------------------------------------------------------------------- layout files
def test_shipped_layouts_keep_the_graphs_and_the_converters_alignment():
    assert sorted(LAYOUTS) == ["coco-17", "ntu-rgb+d", "nw-ucla"]
    for layout in LAYOUTS.values():
        assert load_layout(LAYOUT_DIR / f"{layout.name}.yaml") == layout
        assert Layout_round_trip(layout) == layout
    # The NTU and NW-UCLA converters centre on these joints and rotate the shoulder line (joints 4, 8).
    assert NTU.origin == (20,) and NTU.x_axis == (4, 8) and NTU.root == 20
    assert NW_UCLA.origin == (nwucla.CENTER,) and NW_UCLA.x_axis == nwucla.SHOULDERS
    np.testing.assert_allclose(Graph(NTU).A.sum(axis=(1, 2)), [25, 24, 20])


def Layout_round_trip(layout):
    return get_layout(yaml.safe_load(yaml.safe_dump(layout.to_dict(), sort_keys=False)))


def test_coco17_is_pyskls_graph_with_five_body_parts():
    assert COCO.num_joints == 17 and COCO.joint_names[0] == "nose" and COCO.root == 0
    pyskl_inward = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 5), (12, 6), (9, 7), (7, 5), (10, 8), (8, 6),
                    (5, 0), (6, 0), (1, 0), (3, 1), (2, 0), (4, 2)]
    assert set(COCO.bones) == set(pyskl_inward)
    assert COCO.part_names == ("head", "left_arm", "right_arm", "left_leg", "right_leg")
    assert COCO.body_parts[1] == (5, 7, 9) and COCO.body_parts[4] == (12, 14, 16)
    assert COCO.origin == (5, 6, 11, 12)  # the middle of the torso
    assert Graph(COCO).A.shape == (3, 17, 17) and Graph(COCO, "spatial").A.shape[1:] == (17, 17)


def _coco_spec(**changes):
    spec = COCO.to_dict()
    spec.update(changes)
    return spec


def _write(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False) if not isinstance(spec, str) else spec)
    return path


@pytest.mark.parametrize("change,message", [
    (dict(edgs=[]), r"edgs: unknown key; did you mean 'edges'\?"),
    (dict(name=None), r"name: expected a short printable name; got None"),
    (dict(joints=["a", "a"]), r"joints: 'a' is named twice"),
    (dict(joints=[1, 2]), r"joints: expected a list of 1 to 1000 joint names \(or their count\); got \[1, 2\]"),
    (dict(center="nosee"), r"center: 'nosee' is not a joint of the layout .*; did you mean 'nose'\?"),
    (dict(edges=[["left_eye", 17]]), r"edges\[0\]\[1\]: 17 is not a joint of the layout \(a name from 'joints' or "
                                     r"an index 0..16\)"),
    (dict(edges=[["left_eye"]]), r"edges\[0\]: expected a \[child, parent\] pair; got \['left_eye'\]"),
    (dict(edges=COCO.to_dict()["edges"][:-1]), r"edges: a tree over 17 joints has 16 edges \(bones\), got 15"),
    (dict(edges=COCO.to_dict()["edges"][:-1] + [["right_ankle", "right_ankle"]]),
     r"edges\[15\]: joint 'right_ankle' is its own parent"),
    (dict(edges=COCO.to_dict()["edges"][:-1] + [["left_eye", "right_eye"]]),
     r"edges\[15\]: joint 'left_eye' has a second parent \('nose' and 'right_eye'\): the edges must form a tree"),
    (dict(edges=COCO.to_dict()["edges"][:-1] + [["nose", "right_knee"]]),
     r"edges\[15\]: the center 'nose' has no parent"),
    (dict(edges=[e if e[0] != "right_knee" else ["right_knee", "right_ankle"] for e in COCO.to_dict()["edges"]]),
     r"edges: the cycle right_(knee|ankle) -> right_(knee|ankle) -> right_(knee|ankle) never reaches the center"),
    (dict(parts={"all": COCO.joint_names[:-1]}), r"parts: .*'right_ankle' is in no part"),
    (dict(parts={"a": list(COCO.joint_names), "b": ["nose"]}), r"parts: .*'nose' is in two parts"),
    (dict(parts={"a": []}), r"parts.a: expected a non-empty list of joints; got \[\]"),
    (dict(parts=["nose"]), r"parts: expected a mapping of part names to joint lists"),
    (dict(origin=["nose", "nose"]), r"origin: lists a joint twice"),
    (dict(x_axis=["nose"]), r"x_axis: expected two joints \[from, to\]; got \['nose'\]"),
    (dict(x_axis=[3, "nosee"]), r"x_axis\[1\]: 'nosee' is not a joint of the layout .*did you mean 'nose'\?"),
])
def test_every_layout_mistake_is_one_line_naming_file_and_key(tmp_path, change, message):
    path = _write(tmp_path / "my.yaml", _coco_spec(**change))
    with pytest.raises(LayoutError, match=rf"^{re.escape(str(path))}: {message}") as err:
        load_layout(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("- just\n- a list\n", r"expected a mapping with keys name, joints, center, edges, parts, origin, x_axis; got list"),
    ("name: x\njoints: [a\n", r"not valid YAML: "),
    ("!!python/object/apply:os.system [echo pwned]\n", r"not valid YAML: could not determine a constructor"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nname: bomb\njoints: [*c, *c, *c, *c, *c, *c, *c, *c]\n",
     r"a: unknown key"),
    ("name: x\njoints: " + "[" * 5000 + "]" * 5000 + "\n", r"not a layout file: nested too deeply"),
    ("name: bomb\njoints: &c [[x, x], [x, x]]\ncenter: x\nedges: [*c, *c]\nparts: {a: *c}\n",
     r"joints: expected a list of 1 to 1000 joint names"),
])
def test_hostile_or_broken_yaml_is_refused_in_one_line(tmp_path, text, message):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(LayoutError, match=rf"^{re.escape(str(path))}(:\d+)?: {message}") as err:
        load_layout(path)
    assert "\n" not in str(err.value)


def test_oversized_binary_and_missing_layout_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "# padding\n" * 120_000)
    with pytest.raises(LayoutError, match=r"big\.yaml: larger than 1048576 bytes"):
        load_layout(big)
    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(LayoutError, match=r"bin\.yaml: not UTF-8 text \(byte 6\)"):
        load_layout(tmp_path / "bin.yaml")
    with pytest.raises(FileNotFoundError, match="layout file not found"):
        load_layout(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match=r"layout must be one of \['coco-17', 'ntu-rgb\+d', 'nw-ucla'\] or a layout "
                                         r"YAML file; got 'openpose'"):
        get_layout("openpose")


def test_joint_indices_and_counts_work_like_names(tmp_path):
    spec = {"name": "chain", "joints": 4, "center": 0, "edges": [[1, 0], [2, 1], ["3", 2]],
            "parts": {"top": [0, 1], "bottom": [2, 3]}}
    layout = load_layout(_write(tmp_path / "chain.yaml", spec))
    assert layout.num_joints == 4 and layout.parents() == [0, 0, 1, 2] and layout.origin == (0,)
    assert layout.x_axis is None and layout.joint_names == ("0", "1", "2", "3")


def test_a_thousand_joint_chain_is_checked_quickly(tmp_path):
    import time

    V = 1000  # the most joints a file may name, in the slowest shape to check: one chain ending at the center
    spec = {"name": "chain", "joints": [f"j{k}" for k in range(V)], "center": f"j{V - 1}",
            "edges": [[f"j{k}", f"j{k + 1}"] for k in range(V - 1)], "parts": {"all": [f"j{k}" for k in range(V)]}}
    start = time.perf_counter()
    layout = load_layout(_write(tmp_path / "chain.yaml", spec))
    assert layout.num_joints == V and time.perf_counter() - start < 5
    spec["joints"].append("one too many")
    with pytest.raises(LayoutError, match="joints: expected a list of 1 to 1000 joint names"):
        load_layout(_write(tmp_path / "chain.yaml", spec))


def test_a_layout_file_in_the_config_is_held_as_its_mapping(tmp_path, capsys):
    spec = _coco_spec(name="coco-3parts", parts={"upper": list(COCO.joint_names[:11]),
                                                 "left_leg": ["left_hip", "left_knee", "left_ankle"],
                                                 "right_leg": ["right_hip", "right_knee", "right_ankle"]})
    path = _write(tmp_path / "coco3.yaml", spec)
    config = build_config({}, [f"model.layout={path}"])
    assert config.model.layout == get_layout(path).to_dict()  # no longer depends on the file
    path.unlink()
    assert build_config(config.to_dict()).model.layout == config.model.layout
    assert build_config({}, ["model.layout=coco-17"]).model.layout == "coco-17"
    meta = {"layout": "coco-17", "channels": ["x", "y", "score"]}
    fitted = with_data_input(config, meta, "DATA")  # a custom layout over the data's joints is fine
    assert fitted.model.layout["name"] == "coco-3parts" and fitted.model.channels == "x,y,score"
    auto = with_data_input(build_config({}), meta, "DATA")
    assert auto.model.layout == "coco-17" and auto.model.channels == "x,y,score"
    with pytest.raises(ConfigError, match=r"model.layout: 'nw-ucla' has 20 joints but DATA holds 'coco-17' "
                                          r"skeletons of 17"):
        with_data_input(build_config({}, ["model.layout=nw-ucla"]), meta, "DATA")
    with pytest.raises(ConfigError, match=r"model.channels: the encoder takes x,y,z but DATA holds x,y,score"):
        with_data_input(build_config({}, ["model.channels=x,y,z"]), meta, "DATA")
    with pytest.raises(ConfigError, match=r"model.layout: layout file not found: .*coco3\.yaml"):
        build_config({}, [f"model.layout={path}"])
    bad = _write(tmp_path / "bad.yaml", _coco_spec(center="nosee"))
    assert train.main(["--set", f"model.layout={bad}", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: model.layout: {bad}: center: 'nosee' is not a joint of the layout (a name from 'joints' "
                   "or an index 0..16); did you mean 'nose'?"]


# -------------------------------------------------------------------------------------------- 2-D input
def test_2d_shear_shears_x_y_and_keeps_the_score():
    x = torch.randn(4, 3, 6, 17, 1)
    out = shear(x, 0.5, torch.Generator().manual_seed(0), coords=2)
    a = (torch.rand(4, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.5
    for n in range(4):
        X, Y, S = x[n]
        torch.testing.assert_close(out[n, 0], X + a[n, 0] * Y)
        torch.testing.assert_close(out[n, 1], a[n, 1] * X + Y)
        assert torch.equal(out[n, 2], S)
    draws = draw_augment((4, 2, 6, 17, 1), 0.5, 6, torch.Generator().manual_seed(0), coords=2)
    assert draws["shear"].shape == (4, 2, 2)
    with pytest.raises(ValueError, match=r"shear needs 3 coordinates per joint; x has C=2 \(2-D data: pass "
                                         r"coords=2\)"):
        shear(torch.randn(2, 2, 6, 17, 1))


def test_2d_preprocessing_centres_on_the_origin_and_never_rotates():
    rng = np.random.default_rng(0)
    x = np.zeros((3, 30, 17, 2), np.float32)
    x[:2, 3:25, :, 0] = rng.uniform(100, 500, size=(2, 22, 17))  # pixels; body 0 in frames 3-24, body 1 absent
    x[2, 3:25, :, 0] = rng.uniform(0.1, 1, size=(22, 17))
    out = preprocess(x, 16, COCO.origin, COCO.x_axis, coords=2)
    assert out.shape == (3, 16, 17, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:2, :, list(COCO.origin), 0].mean(axis=2), 0, atol=1e-4)
    np.testing.assert_array_equal(out[..., 1], 0)
    window = x[:, 3:25, :, 0]
    centred = window[:2] - window[:2, :, list(COCO.origin)].mean(axis=2, keepdims=True)
    from skelemix.data.preprocess import resize_time
    np.testing.assert_allclose(out[:2, :, :, 0], resize_time(centred, 16), rtol=1e-5, atol=1e-3)  # no rotation
    np.testing.assert_allclose(out[2, :, :, 0], resize_time(window[2:], 16)[0], rtol=1e-6)  # the score: resized only
    with pytest.raises(ValueError, match=r"expected a \(2 or 3, T, V, M\) sequence \(x, y and maybe a score\)"):
        preprocess(np.zeros((4, 5, 17, 1)), coords=2)


def test_a_pickle_mixing_kinds_of_keypoints_is_refused(tmp_path):
    from skelemix.data.pyskl import prepare_pyskl

    coco_pickle(tmp_path / "a.pkl", n=3)
    data = pickle.loads((tmp_path / "a.pkl").read_bytes())
    del data["annotations"][1]["keypoint_score"]
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(DataFormatError, match=r"a\.pkl: annotations mix 2-D keypoints with and without keypoint_score"):
        prepare_pyskl(tmp_path / "a.pkl", tmp_path / "o", progress=False)
    data["annotations"][1].update(keypoint=np.ones((1, 5, 17, 3), np.float32), total_frames=5)
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(DataFormatError, match=r"a\.pkl: annotations mix 2-D and 3-D keypoints"):
        prepare_pyskl(tmp_path / "a.pkl", tmp_path / "o", progress=False)


def test_a_score_next_to_3d_keypoints_is_not_an_input_channel(tmp_path):
    from skelemix.data.pyskl import prepare_pyskl

    rng = np.random.default_rng(0)
    anns = [{"frame_dir": f"s{i}", "label": 0, "keypoint": rng.normal(size=(1, 6, 25, 3)).astype(np.float32),
             "keypoint_score": np.ones((1, 6, 25), np.float16)} for i in range(2)]
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"split": {"train": ["s0", "s1"]}, "annotations": anns}))
    prepare_pyskl(tmp_path / "a.pkl", tmp_path / "o", frames=8, progress=False)
    ds = PreparedDataset(tmp_path / "o", "train")
    assert ds.meta["channels"] == ["x", "y", "z"] and ds.data.shape == (2, 3, 8, 25, 1)


def coco_pickle(path, n=24, seed=0, frames=(14, 22)):
    """A PYSKL 2-D annotation pickle as PYSKL's ``*_hrnet.pkl`` files hold them: pixel keypoints (M, T, 17, 2)
    and keypoint_score (M, T, 17); splits xsub_train / xsub_val."""
    rng = np.random.default_rng(seed)
    anns = []
    for i in range(n):
        T, M = int(rng.integers(*frames)), 1 + i % 2
        data, _ = layout_data(COCO, 1, T, "x,y", M, seed=seed + i)
        data[0] = data[0] * 40 + np.array([320, 240])[:, None, None, None] + 5 * (i % 3)
        anns.append({"frame_dir": f"S001C001P{1 + i % 4:03d}R001A{1 + i % 3:03d}_{i}", "label": i % 3,
                     "total_frames": T, "img_shape": (480, 640),
                     "keypoint": np.ascontiguousarray(data[0].transpose(3, 1, 2, 0)),
                     "keypoint_score": rng.uniform(0.3, 1.0, size=(M, T, 17)).astype(np.float32)})
    names = [a["frame_dir"] for a in anns]
    path.write_bytes(pickle.dumps({"split": {"xsub_train": names[: 2 * n // 3], "xsub_val": names[2 * n // 3:]},
                                   "annotations": anns}, protocol=4))
    return path


def test_a_2d_coco_pickle_goes_through_prepare_train_evaluate_embed_and_export(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    coco_pickle(tmp_path / "hrnet.pkl")
    assert data_main(["prepare", "pyskl", "--raw", "hrnet.pkl", "--out", "data", "--frames", "16",
                      "--no-progress"]) == 0
    meta = json.loads((tmp_path / "data" / "xsub" / "meta.json").read_text())
    assert meta["layout"] == "coco-17" and meta["channels"] == ["x", "y", "score"] and meta["bodies"] == 2
    val = PreparedDataset("data/xsub", "val")
    assert val.data.shape == (8, 3, 16, 17, 2)
    present = np.abs(val.data[:, :2]).sum(axis=(1, 2, 3)) > 0  # (N, M)
    origin = np.asarray(val.data[:, :2, :, list(COCO.origin)]).mean(axis=-2)  # (N, 2, T, M)
    assert np.abs(origin.transpose(0, 3, 1, 2)[present]).max() < 1e-3  # centred on the torso, in pixels
    assert 0.3 <= val.data[:, 2][present.any(1)].max() <= 1.0  # the score channel, untouched but resized

    assert train.main(["--set", "data.root=data/xsub", "--set", "data.frames=16", *TINY, "--out", "run"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["layout"] == "coco-17" and saved["model"]["channels"] == "x,y,score"
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["data_recipe"]["dataset"] == "pyskl:hrnet.pkl" and ckpt["data_recipe"]["options"]["origin"] == \
        [5, 6, 11, 12]
    assert evaluate.main(["knn", "--checkpoint", "run/checkpoints/last.pt", "--k", "3", "--no-plots",
                          "--features", "backbone", "--out", "eval"]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["val_samples"] == 8

    # Features of the prepared split and of the pickle's annotations, prepared again from the checkpoint's recipe.
    assert embed_main(["--checkpoint", "run/checkpoints/last.pt", "--data", "data/xsub", "--out", "emb",
                       "--no-progress", "--plot", "pca"]) == 0
    assert embed_main(["--checkpoint", "run/checkpoints/last.pt", "--pyskl", "hrnet.pkl", "--split", "xsub_val",
                       "--out", "emb_pkl", "--no-progress", "--batch-size", "3"]) == 0
    a, b = np.load(tmp_path / "emb" / "features.npy"), np.load(tmp_path / "emb_pkl" / "features.npy")
    assert a.shape == (8, 16)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "emb_pkl" / "labels.npy"), val.labels)
    assert (tmp_path / "emb" / "names.txt").read_text() == (tmp_path / "emb_pkl" / "names.txt").read_text()

    formats = ["onnx", "pt2"] if HAVE_ONNX else ["pt2"]
    assert export.main(["--checkpoint", "run/checkpoints/last.pt", "--out", "exp", "--format", *formats]) == 0
    x = torch.from_numpy(np.array(val.data))
    program = torch.export.load(str(tmp_path / "exp" / "encoder.pt2")).module()
    np.testing.assert_allclose(program(x).detach().numpy(), a, rtol=0, atol=1e-5)
    if HAVE_ONNX:
        np.testing.assert_allclose(export.run_onnx(tmp_path / "exp" / "encoder.onnx", x).numpy(), a, rtol=0,
                                   atol=1e-5)
    assert viz.main(["mix", "--data", "data/xsub", "--out", "viz", "--frames", "4", "--step", "4"]) == 0
    assert (tmp_path / "viz" / "mix.png").is_file() and "SkeleMix (coco-17)" in capsys.readouterr().out
    if not HAVE_ONNX:
        pytest.skip(f"ONNX part not run: {ONNX_REASON}")


@pytest.mark.parametrize("layout,channels,bodies", [("ntu-rgb+d", "x,y,z", 2), ("nw-ucla", "x,y,z", 1),
                                                    ("coco-17", "x,y,z", 1)])
def test_every_command_runs_on_every_shipped_layout(tmp_path, monkeypatch, capsys, layout, channels, bodies):
    monkeypatch.chdir(tmp_path)
    write_layout_data(tmp_path / "data", layout, channels=channels, bodies=bodies)
    # viz mix used the NTU layout whatever the data (a 20-joint NW-UCLA set crashed in the mixer).
    assert viz.main(["mix", "--data", "data", "--out", "viz", "--frames", "4", "--step", "8"]) == 0
    out = capsys.readouterr().out
    assert f"SkeleMix ({layout})" in out and (tmp_path / "viz" / "mix.gif").is_file()
    assert train.main(["--set", "data.root=data", "--set", "data.frames=16", "--set", "model.graph=spatial",
                       "--set", "data.view=bone", *TINY, "--out", "run"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["layout"] == layout
    assert evaluate.main(["linear", "--checkpoint", "run/checkpoints/last.pt", "--epochs", "1", "--no-plots",
                          "--out", "eval"]) == 0
    assert embed_main(["--checkpoint", "run/checkpoints/last.pt", "--data", "data", "--out", "emb",
                       "--no-progress"]) == 0
    features = np.load(tmp_path / "emb" / "features.npy")
    assert features.shape == (8, 16) and np.isfinite(features).all()
    formats = ["onnx", "pt2"] if HAVE_ONNX else ["pt2"]
    assert export.main(["--checkpoint", "run/checkpoints/last.pt", "--out", "exp", "--format", *formats]) == 0
    x = torch.from_numpy(np.array(PreparedDataset("data", "val").data))
    program = torch.export.load(str(tmp_path / "exp" / "encoder.pt2")).module()
    np.testing.assert_allclose(program(x).detach().numpy(), features, rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert info["layout"]["name"] == layout and info["view"] == "bone"
    if not HAVE_ONNX:
        pytest.skip(f"ONNX part not run: {ONNX_REASON}")


def test_commands_refuse_data_of_another_skeleton(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_layout_data(tmp_path / "ucla", "nw-ucla")
    write_layout_data(tmp_path / "coco", "coco-17", channels="x,y,score")
    assert train.main(["--set", "data.root=ucla", "--set", "data.frames=16", *TINY, "--out", "run"]) == 0
    capsys.readouterr()
    assert evaluate.main(["knn", "--checkpoint", "run/checkpoints/last.pt", "--data", "coco", "--no-plots"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: model.layout: 'nw-ucla' has 20 joints but coco holds 'coco-17' skeletons of 17 (set "
        "model.layout=auto to take the data's)"]
    assert embed_main(["--checkpoint", "run/checkpoints/last.pt", "--data", "coco", "--out", "e"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: coco holds coco-17 skeletons (17 joints, x,y,score) but the encoder takes nw-ucla (20 joints, x,y,z)"]
    assert train.main(["--set", "data.root=coco", "--set", "data.frames=16", "--set", "model.layout=ntu-rgb+d",
                       *TINY, "--out", "run2"]) == 2
    assert "model.layout: 'ntu-rgb+d' has 25 joints but coco holds 'coco-17'" in capsys.readouterr().err


def test_layout_cli_of_prepare_takes_files_and_refuses_others(tmp_path, capsys):
    path = coco_pickle(tmp_path / "a.pkl", n=6)
    custom = _write(tmp_path / "coco_mine.yaml", _coco_spec(name="coco-mine", origin=["left_hip", "right_hip"]))
    assert data_main(["prepare", "pyskl", "--raw", str(path), "--out", str(tmp_path / "o"), "--layout", str(custom),
                      "--frames", "8", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "o" / "xsub" / "meta.json").read_text())
    assert meta["layout"]["name"] == "coco-mine" and meta["options"]["origin"] == [11, 12]
    bad = _write(tmp_path / "bad.yaml", _coco_spec(joints=16))
    capsys.readouterr()
    assert data_main(["prepare", "pyskl", "--raw", str(path), "--out", str(tmp_path / "o2"), "--layout",
                      str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: center: 'nose' is not a joint")
    assert data_main(["prepare", "pyskl", "--raw", str(path), "--out", str(tmp_path / "o3"), "--layout",
                      "nw-ucla"]) == 1
    assert "wrong joint count: expected 20 (layout nw-ucla), found 17" in capsys.readouterr().err


@pytest.mark.needs_data
def test_viz_mix_draws_prepared_nwucla(shared_data, tmp_path, capsys):
    """The 20-joint NW-UCLA set used to crash `viz mix` (its mixer assumed NTU's 25 joints)."""
    from skelemix.data.nwucla import prepare_nwucla

    prepare_nwucla(shared_data / "nw-ucla", tmp_path / "ucla", frames=32, workers=2, progress=False)
    assert viz.main(["mix", "--data", str(tmp_path / "ucla"), "--out", str(tmp_path / "viz"), "--frames", "4",
                     "--step", "8"]) == 0
    assert "SkeleMix (nw-ucla)" in capsys.readouterr().out and (tmp_path / "viz" / "mix.png").is_file()
