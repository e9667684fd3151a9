"""Config files and ``--set``: numbers as users type them, ranges, ``base:`` chains and hostile YAML."""
import math
import time

import pytest
import torch

from skelemix.cli import short
from skelemix.config import MAX_YAML_NODES, ConfigError, build_config, describe_variant, load_config, load_yaml
from skelemix.train import main as train_main


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1.0e9", 1e9), ("1E5", 1e5), ("2e+2", 200.0), (".5", 0.5), ("0.1", 0.1), ("3", 3.0),
    ("1_000", 1000.0), ("1.5E-3", 1.5e-3),
])
def test_numbers_as_users_type_them(tmp_path, text, value):
    """YAML 1.1 reads 1e-3, 1.0e9 and 1E5 as strings; in --set and in files they are floats."""
    assert build_config({}, [f"optim.lr={text}"]).optim.lr == value
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {text}\n")
    assert load_config(path).optim.lr == value


@pytest.mark.parametrize("text, value", [("-2e-4", -2e-4), ("-.5", -0.5), ("+.25", 0.25)])
def test_signed_numbers(text, value):
    assert build_config({}, [f"data.shear={text}"]).data.shear == value  # shear <= 0 switches it off


def test_whole_floats_are_ints_where_ints_are_expected():
    c = build_config({}, ["train.epochs=1e3", "model.queue_size=1_024", "train.batch_size=1.6E1"])
    assert (c.train.epochs, c.model.queue_size, c.train.batch_size) == (1000, 1024, 16)
    assert isinstance(c.train.epochs, int)
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got float 1.5"):
        build_config({}, ["train.epochs=1.5"])
    with pytest.raises(ConfigError, match=r"model.variant: expected one of .*; got '1e5'"):
        build_config({}, ["model.variant='1e5'"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", r"optim.lr: expected a finite number, got inf"),
    ("optim.lr=1e400", r"optim.lr: expected a finite number, got inf"),
    ("optim.lr=inf", r"optim.lr: expected float, got str 'inf'"),
    ("data.shear=.nan", r"data.shear: expected a finite number, got nan"),
    ("model.temperature=-.inf", r"model.temperature: expected a finite number, got -inf"),
    ("train.knn_t=0", r"train.knn_t: must be > 0; got 0.0"),
    ("train.knn_t=-1e-2", r"train.knn_t: must be > 0; got -0.01"),
    ("optim.weight_decay=-1e-4", r"optim.weight_decay: must be >= 0; got -0.0001"),
    ("optim.momentum=-0.5", r"optim.momentum: must be >= 0; got -0.5"),
    ("train.seed=-1", r"train.seed: must be in \[0, 4294967295\]; got -1"),
    ("train.seed=4294967296", r"train.seed: must be in \[0, 4294967295\]; got 4294967296"),
    ("data.synthetic_seed=-3", r"data.synthetic_seed: must be >= 0; got -3"),
    ("data.synthetic_val=0", r"data.synthetic_val: must be >= 1; got 0"),
    ("model.alpha=-1", r"model.alpha: must be >= 0; got -1.0"),
    ("train.save_interval=-5", r"train.save_interval: must be >= 0; got -5"),
    ("optim.steps=[true]", r"optim.steps: expected a list of epochs; got \[True\]"),
    ("model.swap_params=[[2, 3, 1, 2, 1, .nan]]", r"model.swap_params: each row is .* got \[2, 3, 1, 2, 1, nan\]"),
    ("model.swap_params=[[2, 3, 1, 2.5, 1, 1.0]]",
     r"model.swap_params: each row is .*\(five ints and a finite number\); got \[2, 3, 1, 2.5, 1, 1.0\]"),
])
def test_values_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, [override])


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match=r"optim.nesterov: needs optim.name sgd with optim.momentum > 0; got sgd "
                                          r"with momentum 0.0"):
        build_config({}, ["optim.nesterov=true", "optim.momentum=0"])
    assert build_config({}, ["optim.nesterov=true"]).optim.nesterov


def test_skeletonclr_with_mixing_rows_is_refused():
    with pytest.raises(ConfigError, match=r"model.swap_params: the skeletonclr variant does not mix, but mixing rows "
                                          r"were given: \[\[2, 3, 1, 2, 1, 1.0\]\]; to mix, set model.variant"):
        build_config({}, ["model.variant=skeletonclr", "model.swap_params=[[2, 3, 1, 2, 1, 1.0]]"])
    # No rows (or the variant's own) is what skeletonclr means.
    assert describe_variant(build_config({}, ["model.variant=skeletonclr", "model.swap_params=[]"])) == "skeletonclr"
    assert describe_variant(build_config({}, ["model.variant=skelemixclr"])) == "skelemixclr"
    assert describe_variant(build_config({}, ["model.swap_params=[]"])) == \
        "skelemixclr+ without mixing (model.swap_params: [])"


# ------------------------------------------------------------------------------------------ base: chains
def test_base_cycle_names_every_file(tmp_path):
    for name, base in (("a", "b"), ("b", "c"), ("c", "a")):
        (tmp_path / f"{name}.yaml").write_text(f"base: {base}.yaml\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(tmp_path / "a.yaml")
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    assert str(info.value) == f"{c}: base: the configs inherit from each other in a cycle: {a} -> {b} -> {c} -> {a}"
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="in a cycle: .*self.yaml -> .*self.yaml$"):
        load_yaml(tmp_path / "self.yaml")


def test_a_base_chain_without_cycle_and_a_shared_base(tmp_path):
    (tmp_path / "root.yaml").write_text("optim:\n  lr: 1e-2\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\ntrain:\n  epochs: 7\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\noptim:\n  weight_decay: 0\n")
    c = load_config(tmp_path / "top.yaml")
    assert (c.optim.lr, c.train.epochs, c.optim.weight_decay) == (1e-2, 7, 0.0)


@pytest.mark.parametrize("base, message", [
    ("5", "base: expected the file name of another config, got int 5"),
    ("[a.yaml]", r"base: expected the file name of another config, got list \['a.yaml'\]"),
    ("''", "base: expected the file name of another config, got str ''"),
    ("missing.yaml", r"base: config file not found: .*missing.yaml"),
])
def test_bad_base(tmp_path, base, message):
    (tmp_path / "c.yaml").write_text(f"base: {base}\n")
    with pytest.raises(ConfigError, match=f"c.yaml: {message}"):
        load_yaml(tmp_path / "c.yaml")


def test_a_binary_config_file_is_named(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError, match=r"c.yaml: not a text file"):
        load_yaml(tmp_path / "c.yaml")


# ------------------------------------------------------------------------------------------ hostile YAML
def alias_bomb(levels: int, width: int, flow: bool = False) -> str:
    """Billion laughs: each level lists the previous one ``width`` times (width**levels strings in all); as a
    config file, or (``flow``) as one line for ``--set``."""
    levels_ = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    if flow:
        return "{" + ", ".join(levels_) + f", top: *a{levels}}}"
    return "\n".join(levels_) + f"\ntrain:\n  epochs: *a{levels}\n"


@pytest.mark.parametrize("levels, width", [(9, 5), (9, 9)])
def test_alias_bombs_are_refused_quickly_with_a_short_message(tmp_path, levels, width):
    text = alias_bomb(levels, width)
    assert len(text) < 600 and width ** levels > 1_000_000
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"bomb.yaml: refusing this YAML: it expands to more than {MAX_YAML_NODES} "
                                          "values through its aliases") as info:
        load_config(path)
    assert time.perf_counter() - start < 2 and len(str(info.value)) < 300
    with pytest.raises(ConfigError, match=r"--set 'train.epochs': refusing this YAML: it expands"):
        build_config({}, ["train.epochs=" + alias_bomb(levels, width, flow=True)])


def test_recursive_and_deep_yaml_are_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("train: &t\n  epochs: [*t]\n")
    with pytest.raises(ConfigError, match="loop.yaml: refusing this YAML: it contains a value that contains itself"):
        load_config(path)
    path.write_text("train: " + "[" * 50_000 + "]" * 50_000)
    with pytest.raises(ConfigError, match="loop.yaml: refusing this YAML: it is nested too deeply"):
        load_config(path)


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: &o\n  lr: 0.05\n  weight_decay: 0\n")
    assert load_config(path).optim.lr == 0.05
    path.write_text("model:\n  swap_params: [&row [2, 3, 1, 2, 1, 1.0]]\ndata:\n  frames: 16\n"
                    "train:\n  knn_k: &k [3]\n")
    c = load_config(path)
    assert c.model.swap_params == [[2, 3, 1, 2, 1, 1.0]] and c.train.knn_k == [3]


def test_messages_show_a_bounded_value():
    huge = "x" * 1_000_000
    with pytest.raises(ConfigError) as info:
        build_config({}, [f"model.variant={huge}"])
    assert len(str(info.value)) < 300 and str(info.value).startswith("model.variant: expected one of")
    with pytest.raises(ConfigError) as info:
        build_config({"train": {"epochs": [list(range(1000))] * 1000}})
    assert len(str(info.value)) < 300 and str(info.value).startswith("train.epochs: expected int, got list [[0, 1,")
    loop = []
    loop.append(loop)
    assert len(short(loop)) < 20 and len(short(huge)) < 100 and len(short({i: i for i in range(10**5)})) < 200


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9, 9))
    assert train_main(["--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: refusing this YAML")
    assert train_main(["--set", "optim.lr=.nan", "--no-progress"]) == 2
    assert capsys.readouterr().err == "error: optim.lr: expected a finite number, got nan\n"
    assert train_main(["--set", "train.knn_t=-1", "--no-progress"]) == 2
    assert capsys.readouterr().err == "error: train.knn_t: must be > 0; got -1.0\n"
    assert math.isclose(build_config({}, ["optim.lr=1e-3"]).optim.lr, 1e-3)


# ------------------------------------------------------------------------------------------ fields
def test_moved_keys_are_read_at_their_new_place(tmp_path):
    """train.impl and train.epilogue shape the model: they live in model now, and the old keys still work (in
    files, --set and the configs of older checkpoints), with one note each for the command line to show."""
    notes = []
    c = build_config({}, ["train.impl=eager", "train.epilogue=fused"], notes=notes)
    assert (c.model.impl, c.model.epilogue) == ("eager", "fused") and not hasattr(c.train, "impl")
    assert notes == ["train.impl is now model.impl (the old key still works)",
                     "train.epilogue is now model.epilogue (the old key still works)"]
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  impl: eager\n  epochs: 3\n")
    notes = []
    assert load_config(path, notes=notes).model.impl == "eager" and len(notes) == 1
    assert build_config({"train": {"impl": "cpp"}}, ["model.impl=eager"]).model.impl == "eager"  # the later wins
    assert "impl" in build_config({}).to_dict()["model"] and "impl" not in build_config({}).to_dict()["train"]
    with pytest.raises(ConfigError, match=r"^train.epilogue: expected one of modules, fused; got 'bogus'$"):
        build_config({}, ["train.epilogue=bogus"])  # the key as written
    with pytest.raises(ConfigError, match=r"^model.impl: expected one of auto, eager, cpp, cuda, triton; got 'x'$"):
        build_config({}, ["model.impl=x"])


def test_types_come_from_the_annotations():
    from typing import Literal

    from skelemix.config_files import check_type

    assert check_type("k", None, int | None) is None and type(check_type("k", 3.0, int | None)) is int
    assert check_type("k", 1, float | None) == 1.0 and type(check_type("k", 1, float | None)) is float
    with pytest.raises(ConfigError, match=r"^k: expected int \| None, got str 'a'$"):
        check_type("k", "a", int | None)
    assert check_type("k", [1], list[int]) == [1]
    with pytest.raises(ConfigError, match=r"^k: expected list, got int 1$"):
        check_type("k", 1, list[int])
    assert check_type("k", 2, float) == 2.0 and isinstance(check_type("k", 2, float), float)
    with pytest.raises(ConfigError, match=r"^k: expected one of a, None; got True$"):
        check_type("k", True, Literal["a", None])
    assert check_type("k", False, Literal["auto", "on", "off"]) == "off"  # YAML's bare off
    with pytest.raises(ConfigError, match=r"^model.head: expected one of None, mlp, mlp_nobn, linear; got 'deep'$"):
        build_config({}, ["model.head=deep"])
    with pytest.raises(ConfigError, match=r"^model.layout: expected str \| dict, got int 3$"):
        build_config({}, ["model.layout=3"])


def test_mixing_regions_follow_the_encoders_temporal_stride(monkeypatch):
    from skelemix import config
    from skelemix.models.stgcn import STGCN, TEMPORAL_STRIDE

    assert TEMPORAL_STRIDE == STGCN().temporal_stride == 4
    tiny = ["data.frames=18", "model.queue_size=16", "train.batch_size=8", "model.swap_params=[[2, 3, 1, 2, 1, 1.0]]"]
    with pytest.raises(ConfigError, match=r"data.frames \(18\) must be a multiple of the encoder's temporal stride "
                                          r"\(4\)"):
        build_config({}, tiny)
    monkeypatch.setattr(config, "TEMPORAL_STRIDE", 2)  # what validate reads: an encoder with another plan
    assert build_config({}, tiny).data.frames == 18
    with pytest.raises(ConfigError, match=r"tem_u=10 blocks of 2 frames exceed data.frames=18"):
        build_config({}, tiny + ["model.swap_params=[[2, 3, 1, 10, 1, 1.0]]"])


def test_every_model_field_reaches_its_part():
    """make_pretrain_model passes each model field marked for the encoder, the objective or the mixer."""
    from skelemix.config import make_pretrain_model

    c = build_config({}, ["model.hidden_channels=4", "model.hidden_dim=8", "model.dropout=0.25",
                          "model.edge_importance=false", "model.impl=eager", "model.epilogue=fused",
                          "model.feature_dim=6", "model.queue_size=32", "model.momentum=0.5", "model.temperature=0.3",
                          "model.swap_params=[[1, 2, 1, 3, 2, 0.5]]", "model.head=linear", "model.alpha=2",
                          "model.repeat_reduction=sum", "model.mix_mode=zeros", "model.spatial_mode=random",
                          "model.per_sample=true", "model.partner=derangement", "train.batch_size=16"])
    model = make_pretrain_model(c)
    enc = model.encoder_q
    assert (enc.blocks[0].gcn.conv.out_channels, enc.hidden_dim, enc.blocks[1].tcn[4].p) == (4 * 3, 8, 0.25)
    assert enc.blocks[0].edge_importance is None and enc.impl == "eager" and enc.fused_epilogue
    assert isinstance(enc.fc, torch.nn.Linear) and enc.fc.out_features == 6
    assert (model.queue_size, model.momentum, model.temperature, model.alpha) == (32, 0.5, 0.3, 2.0)
    assert model.repeat_reduction == "sum" and model.swap_params == [(1, 2, 1, 3, 2, 0.5)]
    mixer = model.mixers[0]
    assert (mixer.mode, mixer.spatial_mode, mixer.per_sample, mixer.partner) == ("zeros", "random", True,
                                                                                "derangement")
