"""quant/cli.py: flags built from the config table reject bad values in one line, explicit flags are told from
defaults, and run_main maps every QuantError (and OSError) to one stderr line + its exit code, interrupts to
exit 130, and lets a bug keep its traceback."""
import math
import signal

import pytest

from quant import cli, config
from quant.checkpoint import CheckpointError
from quant.data import DataError
from quant.engine import DivergenceError
from quant.errors import ConfigError, QuantError
from quant.export import NotTernaryError
from quant.results import ResultsError


def make_parser():
    parser = cli.ArgumentParser(prog="train.py")
    cli.add_mode_arg(parser)
    cli.add_train_args(parser)
    cli.add_data_args(parser)
    return parser


def resolve(*argv):
    args = make_parser().parse_args(list(argv))
    return config.resolve(args.mode, cli.given(args))


def exit_code_and_stderr(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    return e.value.code, capsys.readouterr().err


def test_count_types():
    assert cli.positive_int("3") == 3 and cli.non_negative_int("0") == 0
    for fn, bad in ((cli.positive_int, ["0", "-3", "1.5", "x", "inf"]), (cli.non_negative_int, ["-1", "2.5", "nan"])):
        for text in bad:
            with pytest.raises(Exception) as e:
                fn(text)
            assert type(e.value).__name__ == "ArgumentTypeError"


def test_only_given_flags_override():
    args = make_parser().parse_args(["--mode", "ttq", "--t", "0.1", "--batch_size", "32"])
    given = cli.given(args)
    assert given["t"] == 0.1 and given["batch_size"] == 32  # the underscore alias reaches the same key
    assert "lr" not in given and "rho" not in given and "schedule" not in given  # left to the mode / a tuned config
    assert given["epochs"] == config.KEYS["epochs"].default  # budget keys carry the table's default


def test_per_channel_is_a_switch():
    assert resolve("--mode", "twn", "--per-channel")["hyperparams"]["per_channel"] is True
    assert resolve("--mode", "twn")["hyperparams"]["per_channel"] is False


@pytest.mark.parametrize("argv,words", [
    (["--mode", "fp", "--lr", "-1"], ["--lr"]),
    (["--mode", "fp", "--lr", "0"], ["--lr"]),
    (["--mode", "fp", "--lr", "nan"], ["--lr"]),
    (["--mode", "fp", "--batch-size", "0"], ["--batch-size"]),
    (["--mode", "fp", "--batch-size", "1"], ["--batch-size", ">= 2"]),
    (["--mode", "fp", "--epochs", "0"], ["--epochs"]),
    (["--mode", "fp", "--weight-decay", "-1"], ["--weight-decay"]),
    (["--mode", "fp", "--precision", "fp16"], ["--precision", "bf16"]),
    (["--mode", "bogus"], ["--mode", "bogus"]),
    (["--mode", "admm", "--rho", "0"], ["--rho"]),
    (["--mode", "ttq", "--t", "1.5"], ["--t", "(0, 1)"]),
    (["--mode", "fp", "--rho", "1"], ["--rho", "admm"]),
    (["--mode", "twn", "--t", "0.1"], ["--t", "ttq"]),
    (["--mode", "ttq", "--admm-penalty", "loss"], ["--admm-penalty", "admm"]),
    (["--mode", "admm", "--admm-penalty", "l1"], ["--admm-penalty", "prox"]),
    (["--mode", "fp", "--keep-fp", "first"], ["--keep-fp"]),
    (["--mode", "twn", "--keep-fp", "conv9"], ["conv9"]),
    (["--mode", "fp", "--train-subset", "100", "--batch-size", "200"], ["--batch-size", "100"]),
    (["--mode", "fp", "--val-size", "60000"], ["--val-size"]),
    (["--epochs", "1"], ["--mode"]),
])
def test_bad_arguments_exit_2_with_one_line(capsys, restore_sigterm, argv, words):
    code, err = exit_code_and_stderr(capsys, lambda: cli.run_main(lambda: resolve(*argv)))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and (lines[0].startswith("train.py: error:") or lines[0].startswith("error:")), err
    for word in words:
        assert word in lines[0], err


class UnhandledSigterm(AssertionError):
    pass


def _unhandled(signum, frame):
    raise UnhandledSigterm("run_main did not install its SIGTERM handler")


@pytest.fixture
def restore_sigterm():
    """A SIGTERM that run_main failed to handle fails the test instead of killing pytest; restored after."""
    handler = signal.signal(signal.SIGTERM, _unhandled)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("error,code", [
    (DataError("mnist: missing train-images-idx3-ubyte[.gz]; pass --data-dir"), 2),
    (CheckpointError("x.pth: checkpoint file is empty"), 2),
    (ConfigError("--keep-fp is meaningless with --mode fp"), 2),
    (NotTernaryError("layer fc1: 4 distinct values in one scale group (max 3)"), 2),
    (ResultsError("results.csv: line 3 does not match the header"), 2),
    (QuantError("--device cuda requested but CUDA is not available"), 2),
    (FileNotFoundError(2, "No such file or directory", "results/x.csv"), 2),
    (DivergenceError("loss became nan at epoch 1, step 3"), 3),
])
def test_run_main_expected_errors(capsys, restore_sigterm, error, code):
    def main():
        raise error

    exit_code, err = exit_code_and_stderr(capsys, lambda: cli.run_main(main))
    assert exit_code == code
    assert err.strip().splitlines() == [f"error: {error}"]


@pytest.mark.parametrize("bug", [KeyError("a programming error"), ValueError("a shape mismatch deep in a library"),
                                 RuntimeError("a failed tensor op")])
def test_run_main_lets_bugs_through(restore_sigterm, bug):
    def main():
        raise bug

    with pytest.raises(type(bug)):
        cli.run_main(main)


def test_run_main_interrupt(capsys, restore_sigterm):
    def main():
        raise KeyboardInterrupt

    exit_code, err = exit_code_and_stderr(capsys, lambda: cli.run_main(main, lambda: "last good checkpoint is x.pth"))
    assert exit_code == 130 and err.strip() == "interrupted: last good checkpoint is x.pth"


def test_run_main_turns_sigterm_into_interrupt(capsys, restore_sigterm):
    import os

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10 ** 6):  # the handler runs between bytecodes
            math.sqrt(2)
        pytest.fail("SIGTERM did not interrupt main()")

    exit_code, err = exit_code_and_stderr(capsys, lambda: cli.run_main(main, lambda: "stopped"))
    assert exit_code == 130 and "interrupted: stopped" in err


def test_pick_device():
    assert cli.pick_device("cpu").type == "cpu"
    assert cli.pick_device("auto").type in ("cpu", "cuda")


def test_cli_is_not_a_hub():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(cli.__file__).read_text())
    quant = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    quant |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
              and not node.module for alias in node.names}
    assert quant == {"config", "errors"}
