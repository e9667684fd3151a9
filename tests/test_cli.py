"""Every entry point ends a user's mistake in one ``error:`` line and a non-zero exit code, never a traceback;
``--debug`` and ``SKELEMIX_DEBUG=1`` show the traceback."""
import builtins
import errno
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from skelemix import cli, evaluate, info, train, viz
from skelemix.checkpoint import CheckpointError
from skelemix.config import ConfigError
from skelemix.data.__main__ import main as data_main
from skelemix.data.errors import DataFormatError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "data.synthetic_train=16", "--set", "data.synthetic_val=8", "--set", "data.frames=16",
        "--set", "model.hidden_channels=4", "--set", "model.hidden_dim=16", "--set", "model.feature_dim=8",
        "--set", "model.queue_size=16", "--set", "model.swap_params=[[2, 3, 1, 2, 1, 1.0]]",
        "--set", "train.batch_size=8", "--set", "train.knn_interval=0", "--set", "train.final_linear_eval=false"]


def one_line(text: str) -> str:
    """The single line of ``text`` (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in text and text.count("\n") == 1, text
    return text.rstrip("\n")


# ---------------------------------------------------------------------------------------------- handler
@pytest.mark.parametrize("err, line", [
    (ConfigError("optim.lr: must be > 0; got -1.0"), "error: optim.lr: must be > 0; got -1.0"),
    (CheckpointError("x.pt: cannot resume"), "error: x.pt: cannot resume"),
    (DataFormatError("a.json", "bad", line=3), "error: a.json:3: bad"),
    (FloatingPointError("the loss became nan at step 1"), "error: the loss became nan at step 1"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out/config.yaml"),
     "error: /ro/out/config.yaml: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "run/checkpoints/last.pt"),
     "error: run/checkpoints/last.pt: No space left on device"),
    (FileNotFoundError("checkpoint not found: x.pt"), "error: checkpoint not found: x.pt"),
    (pickle.UnpicklingError("refusing to load global os.system"), "error: refusing to load global os.system"),
    (ValueError("two\nlines"), "error: two lines"),
])
def test_user_errors_become_one_line(capsys, err, line):
    def fail():
        raise err

    assert cli.run(fail) == 2
    assert one_line(capsys.readouterr().err) == line
    assert cli.run(fail, exit_code=1) == 1
    capsys.readouterr()


def test_long_messages_are_cut(capsys):
    def fail():
        raise ValueError("x" * 10**6)

    assert cli.run(fail) == 2
    line = one_line(capsys.readouterr().err)
    assert len(line) < cli.MAX_MESSAGE + 100 and line.endswith("... (1000000 characters)")


def test_bugs_keep_their_traceback_and_debug_shows_it(monkeypatch, capsys):
    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run(bug)

    def mistake():
        raise ConfigError("a mistake")

    with pytest.raises(ConfigError):
        cli.run(mistake, debug=True)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigError):
        cli.run(mistake)
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert cli.run(mistake) == 2
    assert one_line(capsys.readouterr().err) == "error: a mistake"


def test_ctrl_c_outside_the_training_loop(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert cli.run(interrupted) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


@pytest.mark.parametrize("main, argv", [
    (train.main, ["--debug", "--set", "optim.lr=0"]),
    (evaluate.main, ["knn", "--checkpoint", "nowhere.pt", "--debug"]),
    (viz.main, ["curves", "nowhere.jsonl", "--debug"]),
])
def test_every_entry_point_has_debug(main, argv):
    with pytest.raises((ConfigError, FileNotFoundError)):
        main(argv)


def test_info_runs_through_the_handler(capsys):
    assert info.main(["--debug"]) == 0 and "torch:" in capsys.readouterr().out


def run_module(module: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=REPO)


def test_a_real_process_prints_one_line_or_with_debug_the_traceback(tmp_path):
    """``python -m``, as users run it: stderr is the one line, and the exit status is not 0."""
    bad = ["--set", "train.knn_t=0", "--out", str(tmp_path)]
    done = run_module("skelemix.train", *bad, env={cli.DEBUG_ENV: ""})
    assert done.returncode == 2 and one_line(done.stderr) == "error: train.knn_t: must be > 0; got 0.0"
    done = run_module("skelemix.train", *bad, env={cli.DEBUG_ENV: "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "ConfigError: train.knn_t" in done.stderr


# ------------------------------------------------------------------------------------------ read-only --out
@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nobody may write in. Root ignores permission bits, so for root the writes below the folder are
    refused at the Python boundary with the error the kernel gives everybody else."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        def refuse(path):
            if Path(os.path.abspath(path)).is_relative_to(folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            refuse(path)
            return real_mkdir(path, *args, **kwargs)

        for module, name, fake in ((builtins, "open", fake_open), (io, "open", fake_open),
                                   (os, "open", fake_os_open), (os, "mkdir", fake_mkdir)):
            monkeypatch.setattr(module, name, fake)
    yield folder
    folder.chmod(0o755)


def test_read_only_out_train(read_only, capsys):
    assert train.main(["--no-progress", "--epochs", "1", "--out", str(read_only / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert one_line(err) == f"error: {read_only / 'run'}: Permission denied"


def test_read_only_out_evaluate(read_only, capsys):
    argv = ["knn", "--checkpoint", "none", "--data", "synthetic", "--out", str(read_only / "eval"), "--k", "3",
            *TINY[:12]]  # the data and the architecture
    assert evaluate.main(argv) == 2
    assert one_line(capsys.readouterr().err) == f"error: {read_only / 'eval'}: Permission denied"


@pytest.mark.needs_data
def test_read_only_out_prepare(read_only, shared_data, tmp_path, capsys):
    raw = tmp_path / "raw" / "all_sqe"
    raw.mkdir(parents=True)
    for view in (1, 2, 3):
        name = f"a01_s01_e00_v0{view}.json"
        (raw / name).symlink_to(shared_data / "nw-ucla" / "all_sqe" / name)
    assert data_main(["prepare", "nwucla", "--raw", str(raw.parent), "--out", str(read_only / "data"),
                      "--no-progress", "--workers", "1"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {read_only / 'data'}") and line.endswith(": Permission denied"), line


@pytest.mark.needs_data
def test_truncated_val_label_pkl(shared_data, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "all_sqe").symlink_to(shared_data / "nw-ucla" / "all_sqe")
    whole = (shared_data / "nw-ucla" / "val_label.pkl").read_bytes()
    for cut in (len(whole) // 2, 3, 0):
        (raw / "val_label.pkl").write_bytes(whole[:cut])
        assert data_main(["prepare", "nwucla", "--raw", str(raw), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"error: {raw / 'val_label.pkl'}: not a readable pickle ("), line
    assert not (tmp_path / "out").exists()
