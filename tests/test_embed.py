"""``python -m skelemix.embed`` and ``skelemix.load_encoder``: features of prepared data, raw files and PYSKL pickles,
prepared as the encoder's training data was; the "Use a trained encoder" section of docs/DOWNSTREAM.md, run as
written."""
import importlib
import json
import pickle
import re
import shlex
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import skelemix
from skelemix import embed, embed_sources, train
from skelemix.checkpoint import export_official
from numpy.lib.format import open_memmap

from skelemix.data import PreparedDataset, write_meta, write_synthetic
from skelemix.data.ntu import prepare_ntu
from skelemix.data.nwucla import prepare_nwucla
from skelemix.embed import main
from skelemix.graph import NTU, NW_UCLA, Graph
from test_layouts import HAVE_ONNX, ONNX_REASON, TINY, coco_pickle, layout_data

DOWNSTREAM = Path(__file__).resolve().parents[1] / "docs" / "DOWNSTREAM.md"
SYNTHETIC = ["--set", "data.synthetic_train=16", "--set", "data.synthetic_val=8", "--set", "data.frames=16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny encoder pretrained for two steps on generated data (ntu-rgb+d, x, y, z, 16 frames)."""
    out = tmp_path_factory.mktemp("run")
    assert train.main([*SYNTHETIC, *TINY, "--out", str(out)]) == 0
    return out / "checkpoints" / "last.pt"


def write_skeleton(path, xyz):
    """An NTU ``.skeleton`` file of ``xyz (T, bodies, 25, 3)`` (absent bodies: all zero in a frame)."""
    lines = [str(len(xyz))]
    for frame in xyz:
        bodies = [b for b in frame if np.abs(b).any()]
        lines.append(str(len(bodies)))
        for k, body in enumerate(bodies):
            lines += [f"7205759403792{k:04d} 0 1 1 1 1 0 0.1 0.2 2", "25"]
            lines += [f"{x:.6f} {y:.6f} {z:.6f} 250 200 1000 500 0.1 0.9 0.1 0.2 2" for x, y, z in body]
    path.write_text("\n".join(lines) + "\n")
    return path


def ntu_files(folder, count=12, seed=0):
    """``count`` generated NTU files: subject 1 (xsub train) and 3 (xsub val), actions 1-3, one or two bodies."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data, _ = layout_data(NTU, 1, 20 + i, "x,y,z", 2, seed=seed + i)
        xyz = data[0].transpose(1, 3, 2, 0) * 0.3 + np.array([0, 0, 3.0])  # (T, M, V, 3), metres from the camera
        if i % 2:
            xyz[:, 1] = 0
        write_skeleton(folder / f"S001C001P{1 + 2 * (i % 2):03d}R{1 + i // 6:03d}A{1 + i % 3:03d}.skeleton", xyz)
    return folder


def ucla_files(folder, count=10, seed=0):
    """``count`` generated NW-UCLA files: views 1 (train) and 3 (val); each body walks 10 cm per frame."""
    (folder / "all_sqe").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data, _ = layout_data(NW_UCLA, 1, 15 + i, "x,y,z", 1, seed=seed + i)
        walk = np.arange(15 + i)[:, None, None] * np.array([0.1, 0, 0.05])
        frames = (data[0, :, :, :, 0].transpose(1, 2, 0) + np.array([0, 0, 2.5]) + walk).tolist()
        name = f"a{[1, 2, 3][i % 3]:02d}_s{1 + i // 3:02d}_e00_v{1 if i % 2 else 3:02d}"
        (folder / "all_sqe" / f"{name}.json").write_text(json.dumps({"file_name": name, "skeletons": frames}))
    return folder


# ------------------------------------------------------------------------------------------ load_encoder
def test_load_encoder_gives_the_eval_mode_encoder_of_the_checkpoint(checkpoint):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    encoder = skelemix.load_encoder(checkpoint)
    assert torch.equal(torch.get_rng_state(), before)  # loading does not reseed the caller's RNG
    assert not encoder.training and all(not m.training for m in encoder.modules())
    assert encoder.layout == NTU and encoder.channels == "x,y,z" and encoder.view == "joint"
    assert encoder.frames == 16 and encoder.feature_dim == 16 and encoder.stgcn.fc is None
    np.testing.assert_array_equal(encoder.stgcn.A.numpy(), Graph(NTU).A.astype(np.float32))
    state = torch.load(checkpoint, weights_only=True)["model"]
    assert torch.equal(encoder.stgcn.blocks[3].gcn.conv.weight, state["encoder_q.blocks.3.gcn.conv.weight"])
    x = torch.randn(5, 3, 16, 25, 2)
    with torch.no_grad():
        eager = skelemix.load_encoder(checkpoint, impl="eager")(x)
        torch.testing.assert_close(encoder(x), eager, rtol=1e-5, atol=1e-5)
        # The pooled backbone feature, as linear evaluation extracts it.
        stgcn = encoder.stgcn
        torch.testing.assert_close(encoder(x), stgcn.pool(stgcn.feature_map(x), 2), rtol=0, atol=0)


def test_an_official_state_dict_loads_with_its_architecture_given(checkpoint, tmp_path):
    from skelemix.evaluate import build_encoder, load_pretrained, projection_head

    pre = load_pretrained(checkpoint)
    head, dim = projection_head(pre.encoder_state)
    official = export_official(build_encoder(pre, dim, head=head, keep_fc=True))
    torch.save(official, tmp_path / "official.pth.tar")
    mine, theirs = skelemix.load_encoder(checkpoint), skelemix.load_encoder(
        tmp_path / "official.pth.tar", overrides=["model.hidden_channels=4", "model.hidden_dim=16"])
    x = torch.randn(3, 3, 16, 25, 2)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), mine(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit the encoder of the config"):
        skelemix.load_encoder(tmp_path / "official.pth.tar")


# ------------------------------------------------------------------------------------------------ embed
def test_embedding_a_prepared_split_in_batches(checkpoint, tmp_path, capsys):
    write_synthetic(tmp_path / "syn", 4, 37, frames=16, seed=3)
    assert main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "syn"), "--out", str(tmp_path / "e"),
                 "--batch-size", "8", "--no-progress"]) == 0
    val = PreparedDataset(tmp_path / "syn", "val")
    features = np.load(tmp_path / "e" / "features.npy")
    with torch.no_grad():
        expected = skelemix.load_encoder(checkpoint)(torch.from_numpy(np.array(val.data))).numpy()
    assert features.shape == (37, 16) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "e" / "labels.npy"), val.labels)
    assert (tmp_path / "e" / "names.txt").read_text() == (tmp_path / "syn" / "val_names.txt").read_text()
    info = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert info["samples"] == 37 and info["layout"] == "ntu-rgb+d" and info["labels"] is True
    assert "wrote 37 x 16 features" in capsys.readouterr().out
    assert not list((tmp_path / "e").glob("*.tmp"))


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident set size from /proc")
def test_memory_stays_flat_as_the_input_grows(checkpoint, tmp_path):
    """8 times the samples: the same peak of Python allocations (batches in, a memory-mapped output), and the
    split's pages are read through the file, not left mapped: a 61 MB split adds nothing resident."""
    peaks = {}
    for n in (48, 384):
        write_synthetic(tmp_path / f"s{n}", 2, n, frames=16, seed=0)
        encoder = skelemix.load_encoder(checkpoint)
        source = embed_sources.prepared_source(encoder, str(tmp_path / f"s{n}"), "val")
        tracemalloc.start()
        embed.embed(encoder, source, tmp_path / f"e{n}", batch_size=16, progress=False)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[384] < 1.5 * peaks[48], peaks
    for n in (128, 1600):  # the small split warms up the allocations of batches of 64 x 64 frames
        root = tmp_path / f"b{n}"
        root.mkdir()
        data = open_memmap(root / "val_data.npy", "w+", np.float32, (n, 3, 64, 25, 2))
        for start in range(0, n, 200):
            data[start:start + 200] = np.random.default_rng(start).normal(size=(min(200, n - start), 3, 64, 25, 2))
        data.flush()
        del data
        np.save(root / "val_label.npy", np.zeros(n, np.int64))
        write_meta(root, dataset="test", layout="ntu-rgb+d", classes=["a"], frames=64, bodies=2, splits={"val": n})
        source = embed_sources.prepared_source(encoder, str(root), "val")
        before = _rss()
        embed.embed(encoder, source, tmp_path / f"e_b{n}", batch_size=64, progress=False)
    grown = _rss() - before
    assert grown < 40 << 20, f"{grown >> 20} MB more resident after reading a 61 MB split"


def test_raw_ntu_files_are_prepared_as_the_training_data_was(tmp_path, capsys):
    raw = ntu_files(tmp_path / "raw")
    # Settings other than the defaults, which embed must take from the checkpoint, not assume.
    prepare_ntu(raw, tmp_path / "ntu", frames=12, official=True, bodies="official", workers=1, progress=False)
    assert train.main(["--set", f"data.root={tmp_path / 'ntu' / 'xsub'}", "--set", "data.frames=12", *TINY,
                       "--set", "train.batch_size=4", "--out", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    assert main(["--checkpoint", ckpt, "--data", str(tmp_path / "ntu" / "xsub"), "--split", "train",
                 "--out", str(tmp_path / "prepared"), "--no-progress"]) == 0
    train_files = sorted(raw.glob("S001C001P001*.skeleton"))
    assert main(["--checkpoint", ckpt, "--raw", *map(str, train_files), "--out", str(tmp_path / "files"),
                 "--batch-size", "4", "--no-progress"]) == 0
    expected = np.load(tmp_path / "prepared" / "features.npy")
    np.testing.assert_allclose(np.load(tmp_path / "files" / "features.npy"), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "files" / "labels.npy"),
                                  np.load(tmp_path / "prepared" / "labels.npy"))
    assert (tmp_path / "files" / "names.txt").read_text() == (tmp_path / "prepared" / "names.txt").read_text()
    info = json.loads((tmp_path / "files" / "embed.json").read_text())
    assert info["preparation"]["options"] == {"frames": 12, "official": True, "bodies": "official"}
    # The inputs too (a briefly trained encoder's eval-mode features hardly depend on them).
    source = embed_sources.raw_source(skelemix.load_encoder(ckpt), list(map(str, train_files)), workers=1)
    samples = [x for batch in source.batches(4) for _, _, x in batch]
    np.testing.assert_allclose(np.stack(samples), PreparedDataset(tmp_path / "ntu" / "xsub", "train").data,
                               rtol=0, atol=1e-6)
    # A folder, parsed by two processes: the same features for all 12 files.
    assert main(["--checkpoint", ckpt, "--raw", str(raw), "--out", str(tmp_path / "folder"), "--workers", "2",
                 "--no-progress"]) == 0
    both = np.load(tmp_path / "folder" / "features.npy")
    assert both.shape == (12, 16)
    names = (tmp_path / "folder" / "names.txt").read_text().split()
    rows = [names.index(f.stem) for f in train_files]
    np.testing.assert_allclose(both[rows], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("centre", ["frame", "first"])
def test_raw_nwucla_files_and_inputs_left_out(tmp_path, capsys, centre):
    """Raw NW-UCLA files get the features of the same samples prepared, with either centring (the checkpoint's
    data recipe carries it)."""
    raw = ucla_files(tmp_path / "raw")
    prepare_nwucla(raw, tmp_path / "ucla", frames=12, workers=1, progress=False, centre=centre)
    moved = np.abs(PreparedDataset(tmp_path / "ucla", "train").data[:, :, :, 2]).max()
    assert (moved > 0.5) if centre == "first" else (moved == 0)  # the files' root joint moves
    assert train.main(["--set", f"data.root={tmp_path / 'ucla'}", "--set", "data.frames=12", *TINY,
                       "--set", "train.batch_size=4", "--out", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    # The inputs themselves (a briefly trained encoder's eval-mode features hardly depend on them): the raw
    # files are prepared as the training data was, with the checkpoint's centring.
    val = PreparedDataset(tmp_path / "ucla", "val")
    source = embed_sources.raw_source(skelemix.load_encoder(ckpt), [str(raw / "all_sqe")], workers=1)
    samples = {name: x for batch in source.batches(4) for name, _, x in batch}
    assert len(samples) == 10
    for name, x in zip((tmp_path / "ucla" / "val_names.txt").read_text().split(), val.data):
        np.testing.assert_allclose(samples[name], x, rtol=0, atol=1e-6)
    assert main(["--checkpoint", ckpt, "--data", str(tmp_path / "ucla"), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    # Another name (no label), and a file in which no body appears (left out, as prepare leaves it out).
    val = sorted((raw / "all_sqe").glob("*_v03.json"))
    (tmp_path / "mine").mkdir()
    for f in val:
        (tmp_path / "mine" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "mine" / "my_recording.json").write_bytes(val[0].read_bytes())
    (tmp_path / "mine" / "empty_room.json").write_text(json.dumps({"skeletons": [[[0, 0, 0]] * 20] * 5}))
    capsys.readouterr()
    assert main(["--checkpoint", ckpt, "--raw", str(tmp_path / "mine"), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: 1 input(s) without a body in any frame were left out: empty_room" in out
    names = (tmp_path / "r" / "names.txt").read_text().split()
    assert names == sorted(f.stem for f in val) + ["my_recording"]
    features = np.load(tmp_path / "r" / "features.npy")
    np.testing.assert_allclose(features[:-1], np.load(tmp_path / "p" / "features.npy"), rtol=0, atol=1e-5)
    np.testing.assert_allclose(features[-1], features[0], rtol=0, atol=1e-5)
    assert not (tmp_path / "r" / "labels.npy").exists()  # my_recording has no label
    assert json.loads((tmp_path / "r" / "embed.json").read_text())["left_out_no_body"] == ["empty_room"]


def test_pyskl_annotations_and_plots(tmp_path, capsys):
    coco_pickle(tmp_path / "a.pkl", n=12)
    from skelemix.data.pyskl import prepare_pyskl

    prepare_pyskl(tmp_path / "a.pkl", tmp_path / "d", frames=16, progress=False)
    assert train.main(["--set", f"data.root={tmp_path / 'd' / 'xsub'}", "--set", "data.frames=16", *TINY,
                       "--set", "train.batch_size=4", "--out", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    assert main(["--checkpoint", ckpt, "--pyskl", str(tmp_path / "a.pkl"), "--out", str(tmp_path / "all"),
                 "--no-progress", "--plot", "pca"]) == 0
    assert np.load(tmp_path / "all" / "features.npy").shape == (12, 16)
    assert (tmp_path / "all" / "embedding.png").stat().st_size > 0
    pytest.importorskip("sklearn", reason="t-SNE needs scikit-learn (pip install -e .[embed])")
    assert main(["--checkpoint", ckpt, "--pyskl", str(tmp_path / "a.pkl"), "--split", "xsub_val", "--out",
                 str(tmp_path / "val"), "--no-progress", "--plot", "tsne"]) == 0
    assert json.loads((tmp_path / "val" / "embed.json").read_text())["files"][-2:] == ["embedding.png", "embed.json"]


def _error(capsys, argv, code=2) -> str:
    capsys.readouterr()
    assert main(argv) == code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_end_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    ck = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), "--no-progress"]
    (tmp_path / "notes.txt").write_text("x")
    assert _error(capsys, [*ck, "--raw", str(tmp_path / "notes.txt")]) == (
        f"error: {tmp_path / 'notes.txt'}: expected an NTU .skeleton file, an NW-UCLA .json file or a folder of them")
    assert _error(capsys, [*ck, "--raw", str(tmp_path / "S001C001P001R001A001.skeleton")]) == (
        f"error: raw file not found: {tmp_path / 'S001C001P001R001A001.skeleton'}")
    ucla_files(tmp_path / "u", count=1)
    ntu_files(tmp_path / "n", count=1)
    both = [str(next((tmp_path / "u" / "all_sqe").iterdir())), str(next((tmp_path / "n").iterdir()))]
    assert "mixes NTU .skeleton and NW-UCLA .json files" in _error(capsys, [*ck, "--raw", *both])
    assert _error(capsys, [*ck, "--raw", both[0]]) == (
        f"error: {tmp_path / 'u' / 'all_sqe'} (.json files) holds nw-ucla skeletons (20 joints, x,y,z) but the encoder "
        "takes ntu-rgb+d (25 joints, x,y,z)")
    broken = tmp_path / "broken" / "S001C001P001R001A002.skeleton"
    broken.parent.mkdir()
    broken.write_text("2\n1\n")
    assert re.fullmatch(rf"error: {re.escape(str(broken))}:3: file ends early \(truncated\?\).*",
                        _error(capsys, [*ck, "--raw", str(broken)]))
    assert _error(capsys, ["--checkpoint", str(tmp_path / "none.pt"), "--data", "x", "--out", "o"]).startswith(
        f"error: checkpoint not found: {tmp_path / 'none.pt'}")
    coco_pickle(tmp_path / "c.pkl", n=3)
    assert _error(capsys, [*ck, "--pyskl", str(tmp_path / "c.pkl")]) == (
        f"error: {tmp_path / 'c.pkl'}: annotation 0 ('S001C001P001R001A001_0'): wrong joint count: expected 25 "
        "(layout ntu-rgb+d), found 17")
    ntu_like = {"split": {"s": ["a\nb"]}, "annotations": [{"frame_dir": "a\nb", "label": 0,
                                                           "keypoint": np.ones((1, 8, 25, 3), np.float32)}]}
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(ntu_like))
    assert "refusing sample name 'a\\nb': it contains a control" in _error(capsys, [*ck, "--pyskl",
                                                                                   str(tmp_path / "evil.pkl")])
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({**ntu_like, "annotations": [
        {**ntu_like["annotations"][0], "frame_dir": "ok"}], "split": {"s": ["ok"]}}))
    assert _error(capsys, [*ck, "--pyskl", str(tmp_path / "evil.pkl"), "--split", "t"]) == (
        f"error: {tmp_path / 'evil.pkl'}: no split 't'; it has ['s']")
    monkeypatch.setitem(__import__("sys").modules, "sklearn.manifold", None)  # scikit-learn not installed
    write_synthetic(tmp_path / "syn", 2, 2, frames=16)
    assert _error(capsys, [*ck, "--data", str(tmp_path / "syn"), "--plot", "tsne"]) == (
        "error: --plot tsne needs scikit-learn (pip install scikit-learn, or pip install -e .[embed]); --plot pca "
        "needs nothing")
    assert not (tmp_path / "o" / "features.npy").exists()  # refused before any work
    with pytest.raises(SystemExit) as exit_:
        main([*ck, "--data", "x", "--batch-size", "0"])
    assert exit_.value.code == 2
    with pytest.raises(FileNotFoundError):  # --debug: the traceback instead of the line
        main(["--checkpoint", str(tmp_path / "none.pt"), "--data", "x", "--out", "o", "--debug"])


# ----------------------------------------------------------------------------------- docs/DOWNSTREAM.md
def _section_blocks(title):
    """The fenced code blocks ``(language, text)`` of the docs/DOWNSTREAM.md section ``## title``."""
    text = DOWNSTREAM.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def test_the_downstream_page_runs_as_written(tmp_path, monkeypatch):
    """Every command and snippet of "Use a trained encoder", verbatim, on a tiny demo checkpoint."""
    if not HAVE_ONNX:
        pytest.skip(f"the section exports to ONNX: {ONNX_REASON}")
    monkeypatch.chdir(tmp_path)
    assert train.main([*SYNTHETIC, *TINY, "--out", "runs/demo"]) == 0
    write_synthetic("data/synthetic", 8, 8, frames=16)
    ntu_files(tmp_path / "nturgb+d_skeletons", count=3)
    blocks = _section_blocks("Use a trained encoder")
    assert [lang for lang, _ in blocks] == ["bash", "python", "python"]
    namespace = {}
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, str(DOWNSTREAM), "exec"), namespace)
            continue
        for line in code.strip().splitlines():
            words = shlex.split(line)
            assert words[:2] == ["python", "-m"], line
            assert importlib.import_module(words[2]).main(words[3:]) == 0, line
    assert namespace["features"].shape == (4, 16)
    assert np.load("runs/demo/embed/features.npy").shape == (8, 16)
    assert (tmp_path / "runs/demo/embed/embedding.png").is_file()
    assert np.load("runs/demo/embed_raw/features.npy").shape == (3, 16)
    assert {p.name for p in Path("runs/demo/export").iterdir()} == {"encoder.onnx", "encoder.pt2", "export.json"}


@pytest.mark.needs_data
def test_real_files_embed_like_their_prepared_dataset(checkpoint, shared_data, tmp_path, capsys):
    """The NTU sample files, raw and prepared by `python -m skelemix.data prepare ntu60` with the settings the
    checkpoint records (here none: the defaults at the encoder's 16 frames)."""
    prepare_ntu(shared_data / "ntu", tmp_path / "ntu", frames=16, workers=1, progress=False)
    for split in ("train", "val"):
        assert main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "ntu" / "xview"), "--split", split,
                     "--out", str(tmp_path / f"p_{split}"), "--no-progress"]) == 0
    assert main(["--checkpoint", str(checkpoint), "--raw", str(shared_data / "ntu"), "--out", str(tmp_path / "raw"),
                 "--no-progress", "--workers", "2"]) == 0
    names = (tmp_path / "raw" / "names.txt").read_text().split()
    features = np.load(tmp_path / "raw" / "features.npy")
    for split in ("train", "val"):
        rows = [names.index(n) for n in (tmp_path / f"p_{split}" / "names.txt").read_text().split()]
        np.testing.assert_allclose(features[rows], np.load(tmp_path / f"p_{split}" / "features.npy"), rtol=0,
                                   atol=1e-5)
    assert np.load(tmp_path / "raw" / "labels.npy").tolist() == [int(n[-3:]) - 1 for n in names]
