from skelemix.train import main


def test_two_step_demo_run(capsys):
    assert main(["--epochs", "1", "--samples", "12", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "2 steps" in out
