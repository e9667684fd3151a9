"""bench/sweep.py: the statistics against published values and exhaustive enumeration, --set parsing and the variant
product, resuming a half-finished sweep, the report, and one tiny real sweep (2 seeds x 2 variants)."""
import itertools
import json
import math
import random
import sys
from pathlib import Path

import pytest

from bench import sweep  # on the path through conftest.py
from bench.sweep import SweepError, fisher_exact, mann_whitney, parse_sets, split_values, variants

from test_train import TINY  # noqa: E402


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("table, p", [
    ((8, 2, 1, 5), 5 / 143),  # scipy.stats.fisher_exact docs (whales and sharks): 0.0349650...
    ((3, 1, 1, 3), 17 / 35),  # Fisher's lady tasting tea, two-sided: 0.486
    ((6, 2, 1, 4), 4 / 39),  # 0.1025641... as scipy 1.17 gives
    ((5, 0, 0, 5), 2 / 252),  # the two most extreme tables of C(10, 5)
    ((0, 0, 3, 4), 1.0),  # an empty row: every table is the observed one
])
def test_fisher_exact_known_values(table, p):
    a, b, c, d = table
    assert fisher_exact(a, b, c, d) == pytest.approx(p, rel=1e-12)
    assert fisher_exact(c, d, a, b) == pytest.approx(p, rel=1e-12)  # rows swapped
    assert fisher_exact(a, c, b, d) == pytest.approx(p, rel=1e-12)  # transposed


def test_mann_whitney_published_example():
    """scipy.stats.mannwhitneyu docs: males [19, 22, 16, 29, 24] vs females [20, 11, 17, 12]: U1 = 17, exact p = 1/9."""
    males, females = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    assert mann_whitney(males, females) == (17.0, pytest.approx(1 / 9, rel=1e-12))
    assert mann_whitney(females, males) == (3.0, pytest.approx(1 / 9, rel=1e-12))  # U2 = n1 n2 - U1


def test_mann_whitney_with_ties_matches_scipy_permutation_test():
    """Tied accuracies (as on a 440-sample validation set): scipy 1.17.1's exact permutation test,
    mannwhitneyu(x, y, method=PermutationMethod()) over all C(15, 8) splits, gives 0.4108780108780109."""
    x, y = [81.2, 92.0, 33.2, 88.5, 92.0, 41.0, 85.0, 85.0], [31.1, 92.0, 88.5, 40.0, 39.3, 77.7, 85.0]
    assert mann_whitney(x, y) == (35.5, pytest.approx(0.4108780108780109, rel=1e-12))


def _brute_force_mann_whitney(x, y):
    """U by counting pairs (ties half), p as twice the smaller tail over every split of the pooled values."""
    def u_of(a, b):
        return sum((ai > bi) + 0.5 * (ai == bi) for ai in a for bi in b)

    pooled, n1 = x + y, len(x)
    us = []
    for chosen in itertools.combinations(range(len(pooled)), n1):
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        us.append(u_of([pooled[i] for i in chosen], rest))
    u = u_of(x, y)
    tail = min(sum(v <= u for v in us), sum(v >= u for v in us)) / len(us)
    return u, min(1.0, 2 * tail)


def test_mann_whitney_against_enumeration_with_and_without_ties():
    rng = random.Random(0)
    for trial in range(30):
        n1, n2 = rng.randint(1, 7), rng.randint(1, 6)
        draw = (lambda: rng.randint(0, 4)) if trial % 2 else rng.random  # odd trials: many ties
        x, y = [draw() for _ in range(n1)], [draw() + (trial % 3 == 0) for _ in range(n2)]
        u, p = mann_whitney(x, y)
        u_ref, p_ref = _brute_force_mann_whitney(x, y)
        assert u == u_ref and p == pytest.approx(p_ref, rel=1e-12), (x, y)
    assert all(math.isnan(v) for v in mann_whitney([], [1.0, 2.0]))


# ---------------------------------------------------------------------------------------------- the plan
def test_split_values_keeps_brackets_and_quotes_whole():
    assert split_values("fused,modules") == ["fused", "modules"]
    assert split_values("[[2, 3, 1, 2, 1, 1.0]]") == ["[[2, 3, 1, 2, 1, 1.0]]"]
    assert split_values("[10, 20], [30], {a: 1, b: 2}") == ["[10, 20]", "[30]", "{a: 1, b: 2}"]
    assert split_values("'a,b',\"c,d\",e") == ["'a,b'", '"c,d"', "e"]


def test_sets_give_fixed_overrides_and_the_variant_product():
    fixed, axes = parse_sets(["train.epilogue=fused,modules", "train.epochs=3", "optim.lr=0.001,0.01,0.1",
                              "optim.steps=[10, 20]"])
    assert fixed == ["train.epochs=3", "optim.steps=[10, 20]"]
    assert axes == {"train.epilogue": ["fused", "modules"], "optim.lr": ["0.001", "0.01", "0.1"]}
    got = variants(axes)
    assert len(got) == 6 and got[0] == {"train.epilogue": "fused", "optim.lr": "0.001"}
    assert got[1] == {"train.epilogue": "fused", "optim.lr": "0.01"} and got[5]["train.epilogue"] == "modules"
    assert sweep.parsed(got[0]) == {"train.epilogue": "fused", "optim.lr": 0.001}
    assert variants({}) == [{}]


@pytest.mark.parametrize("sets, message", [
    (["train.epochs"], r"--set expects key=value or key=value1,value2,...; got 'train.epochs'"),
    (["train.seed=1,2"], r"--set train.seed: the sweep sets it for every run \(use --seeds and --first-seed\)"),
    (["train.out=x"], r"--set train.out: the sweep sets it for every run \(use --out\)"),
    (["train.epilogue=fused", "train.epilogue=modules"], r"--set train.epilogue is given twice"),
    (["train.epilogue=fused,"], r"--set train.epilogue: empty value in 'fused,'"),
    (["train.epilogue=fused,fused"], r"--set train.epilogue: a value is repeated"),
])
def test_bad_sets_are_named(sets, message, tmp_path, capsys):
    with pytest.raises(SweepError, match=message):
        parse_sets(sets)
    argv = ["--out", str(tmp_path / "s")] + [a for s in sets for a in ("--set", s)]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds: must be >= 1; got 0"),
    (["--jobs", "0"], "--jobs: must be >= 1; got 0"),
    (["--first-seed", "-1"], "--first-seed: must be >= 0; got -1"),
])
def test_bad_counts_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep.main(argv)
    assert exc.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


def test_invalid_variant_config_stops_before_any_run(tmp_path, capsys):
    assert sweep.main(["--out", str(tmp_path / "s"), "--set", "train.epilogue=fused,bogus"]) == 2
    assert capsys.readouterr().err == ("error: variant train.epilogue=bogus: train.epilogue: expected one of modules, "
                                       "fused; got 'bogus'\n")
    assert not (tmp_path / "s").exists()


def _record(seed, epilogue, top1, random_init=40.0, exit=0):
    return {"seed": seed, "variant": {"train.epilogue": epilogue}, "exit": exit, "loss": 5.0, "knn": {"knn@10": 50.0},
            "linear_top1": top1, "linear_top1_random_init": random_init, "wall_s": 10.0, "out": "x"}


def test_resume_skips_recorded_runs_and_restarts_unfinished_ones(tmp_path):
    out, axes = tmp_path / "s", {"train.epilogue": ["fused", "modules"]}
    todo = sweep.plan(out, None, ["train.epochs=2"], axes, [0, 1, 2])
    assert [(r["seed"], r["variant"]["train.epilogue"]) for r in todo] == [
        (s, v) for s in (0, 1, 2) for v in ("fused", "modules")]  # every variant of a seed before the next seed
    assert todo[0]["dir"] == out / "train.epilogue=fused" / "seed0"
    # A sweep stopped after three results, with a fourth run half written.
    (out / "runs.jsonl").write_text("".join(json.dumps(_record(s, v, 90.0)) + "\n"
                                            for s, v in ((0, "fused"), (0, "modules"), (1, "modules"))))
    half = out / "train.epilogue=fused" / "seed1"
    (half / "checkpoints").mkdir(parents=True)
    (half / "metrics.jsonl").write_text('{"kind": "step"}\n')
    todo = sweep.plan(out, None, ["train.epochs=2"], axes, [0, 1, 2])
    assert [(r["seed"], r["variant"]["train.epilogue"]) for r in todo] == [(1, "fused"), (2, "fused"), (2, "modules")]
    assert not half.exists()  # restarted from scratch
    with pytest.raises(SweepError, match=r"holds a sweep with other settings for every run \(--config None there, "
                                         r"demo.yaml here; --set only there: train.epochs=2; --set only here: "
                                         r"train.epochs=3\)\. Use another --out"):
        sweep.plan(out, "demo.yaml", ["train.epochs=3"], axes, [0, 1, 2])
    (out / "runs.jsonl").write_text('{"variant": {}}\n')
    with pytest.raises(SweepError, match=r"runs.jsonl: record 1 lacks an integer seed and a variant object"):
        sweep.plan(out, None, ["train.epochs=2"], axes, [0])
    (out / "sweep.json").write_text("{")
    with pytest.raises(SweepError, match=r"sweep.json: not valid JSON"):
        sweep.plan(out, None, ["train.epochs=2"], axes, [0])


# ---------------------------------------------------------------------------------------------- the report
def test_report_counts_escapes_and_tests_the_pair(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    fused = [90.0, 91.0, 35.0, 88.0, 92.0]  # 4 of 5 escape
    modules = [30.0, 33.0, 85.0, 31.0, 75.0]  # 75 is only 25 points above its random init (50): 1 of 5 escapes
    runs = [_record(s, "fused", a) for s, a in enumerate(fused)]
    runs += [_record(s, "modules", a, random_init=50.0 if a == 75.0 else 40.0) for s, a in enumerate(modules)]
    runs += [_record(5, "modules", None, exit=1)]  # a failed run: counted as failed, not in the statistics
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert sweep.main(["--report", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("train.epilogue=")]
    assert len(rows) == 3  # two variants, one pair
    fused_row, modules_row, pair = rows
    assert fused_row.startswith("train.epilogue=fused ") and modules_row.startswith("train.epilogue=modules ")
    assert fused_row.split()[1:5] == ["5", "0", "4/5", "(80%)"] and "90.0" in fused_row and "35.0-92.0" in fused_row
    assert modules_row.split()[1:5] == ["5", "1", "1/5", "(20%)"] and "33.0" in modules_row
    u, p_mw = mann_whitney(fused, modules)
    assert "4/5 vs 1/5" in pair
    assert fisher_exact(4, 1, 1, 4) == pytest.approx(52 / 252) and "0.206" in pair
    assert f"{u:g}" in pair and f"{p_mw:.3g}" in pair and "-57.0" in pair
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert sweep.main(["--report", str(out), "--escape-gain", "20", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| variant | n | failed | escaped |" in text and "| --- |" in text
    assert "| train.epilogue=modules | 5 | 1 | 2/5 (40%) |" in text  # 75 vs 50 escapes at a 20-point gain


def test_report_of_a_missing_sweep_is_one_line(tmp_path, capsys):
    assert sweep.main(["--report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: no runs in {tmp_path}: {tmp_path / 'runs.jsonl'} does not exist\n"


def test_failed_runs_are_recorded_and_interrupted_ones_are_not(tmp_path, monkeypatch, capsys):
    """A run that fails by itself is a result (recorded, skipped on resume); one ended by a signal or Ctrl-C is not."""
    codes = {0: 3, 1: 130, 2: -9}
    monkeypatch.setattr(sweep, "command", lambda run, config, fixed: [
        sys.executable, "-c", f"import os, sys; print('x'); sys.exit({codes[run['seed']]}) if "
                              f"{codes[run['seed']]} >= 0 else os.kill(os.getpid(), 9)"])
    out = tmp_path / "s"
    todo = sweep.plan(out, None, [], {}, [0, 1, 2])
    assert sweep.sweep(todo, None, [], out, jobs=2) == 0
    text = capsys.readouterr().out
    assert "seed 0: failed (exit 3); see" in text and "log.txt (recorded: delete its line" in text
    assert "seed 1: stopped by a signal (exit 130); not recorded, the next sweep restarts it" in text
    assert "seed 2: stopped by a signal (exit -9)" in text
    records = sweep.load_runs(out)
    assert [(r["seed"], r["exit"], r["linear_top1"]) for r in records] == [(0, 3, None)]
    assert (out / "default" / "seed0" / "log.txt").read_text() == "x\n"
    assert [r["seed"] for r in sweep.plan(out, None, [], {}, [0, 1, 2])] == [1, 2]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_sweep_runs_resumes_and_reports(tmp_path, capsys):
    """2 seeds x 2 variants of a tiny config, 2 processes at a time, then the same command with nothing left to do."""
    out = tmp_path / "sweep"
    argv = ["--seeds", "2", "--jobs", "2", "--out", str(out), "--set", "train.epilogue=fused,modules",
            "--set", "train.epochs=1", "--set", "train.linear_epochs=2"]
    for item in TINY:
        if not item.startswith("train.final_linear_eval"):
            argv += ["--set", item]
    assert sweep.main(argv) == 0
    text = capsys.readouterr().out
    assert f"sweep {out}: 4 of 4 runs to do (0 recorded), 2 at a time" in text
    records = sweep.load_runs(out)
    assert sorted((r["seed"], r["variant"]["train.epilogue"]) for r in records) == [
        (0, "fused"), (0, "modules"), (1, "fused"), (1, "modules")]
    for r in records:
        assert r["exit"] == 0 and all(isinstance(r[k], float) and math.isfinite(r[k])
                                      for k in ("loss", "linear_top1", "linear_top1_random_init", "wall_s"))
        assert list(r["knn"]) == ["knn@3"]
        assert "linear evaluation on 8 held-out sequences" in (Path(r["out"]) / "log.txt").read_text()
    assert [line.split()[1] for line in text.splitlines() if line.startswith("train.epilogue=")][:2] == ["2", "2"]
    assert "Fisher p" in text and (out / "sweep.png").is_file()

    assert sweep.main(argv) == 0  # the same command again: nothing left to do
    assert "0 of 4 runs to do (4 recorded)" in capsys.readouterr().out and len(sweep.load_runs(out)) == 4
