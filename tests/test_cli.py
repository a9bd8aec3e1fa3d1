"""quant/cli.py: validated flag types, config precedence, one-line argument errors, and run_main's
mapping of expected errors to one stderr line + exit 2 (3 for divergence) and interrupts to exit 130."""
import argparse
import math
import signal

import pytest

from quant import cli
from quant.checkpoint import CheckpointError
from quant.data import DataError
from quant.engine import DivergenceError
from quant.methods import DEFAULTS, HYPERPARAMS


def make_parser():
    parser = cli.ArgumentParser(prog="train.py")
    cli.add_mode_arg(parser)
    cli.add_train_args(parser)
    cli.add_data_args(parser)
    return parser


def resolve(*argv, base=None):
    parser = make_parser()
    return cli.resolve_config(parser, parser.parse_args(list(argv)), base)


def exit_code_and_stderr(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("fn,good,bad", [
    (cli.positive_float, {"1e-3": 1e-3, "2": 2.0}, ["0", "-1", "-0.0", "nan", "inf", "abc", ""]),
    (cli.positive_int, {"1": 1, "128": 128}, ["0", "-3", "1.5", "x"]),
    (cli.non_negative_int, {"0": 0, "7": 7}, ["-1", "2.0", "x"]),
    (cli.open_unit_interval, {"0.5": 0.5, "1e-9": 1e-9}, ["0", "1", "1.5", "-0.1", "nan"]),
    (cli.unit_fraction, {"0": 0.0, "0.99": 0.99}, ["1", "-0.1", "nan", "x"]),
])
def test_flag_types(fn, good, bad):
    for text, value in good.items():
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_mode_defaults():
    for mode in HYPERPARAMS:
        config = resolve("--mode", mode)
        assert config["mode"] == mode and config["lr"] == DEFAULTS[mode]["lr"]
        assert config["batch_size"] == DEFAULTS[mode]["batch_size"]
        assert config["hyperparams"] == HYPERPARAMS[mode] and config["keep_fp"] == []


def test_admm_penalty_flag():
    assert resolve("--mode", "admm")["hyperparams"]["penalty"] == "prox"
    assert resolve("--mode", "admm", "--admm-penalty", "loss")["hyperparams"]["penalty"] == "loss"


def test_precedence_defaults_then_base_then_flags():
    base = {"lr": 0.01, "batch_size": 64, "hyperparams": {"rho": 0.5}}
    config = resolve("--mode", "admm", "--batch_size", "32", "--rho-growth", "2", base=base)
    assert config["lr"] == 0.01  # from base
    assert config["batch_size"] == 32  # flag beats base (underscore alias accepted)
    assert config["hyperparams"]["rho"] == 0.5 and config["hyperparams"]["rho_growth"] == 2.0
    assert config["hyperparams"]["admm_rounds"] == HYPERPARAMS["admm"]["admm_rounds"]


def test_keep_fp_aliases():
    assert resolve("--mode", "twn", "--keep-fp", "last,first")["keep_fp"] == ["conv1", "fc2"]


@pytest.mark.parametrize("argv,words", [
    (["--mode", "fp", "--lr", "-1"], ["--lr"]),
    (["--mode", "fp", "--lr", "0"], ["--lr"]),
    (["--mode", "fp", "--batch-size", "0"], ["--batch-size"]),
    (["--mode", "fp", "--epochs", "0"], ["--epochs"]),
    (["--mode", "bogus"], ["--mode", "bogus"]),
    (["--mode", "admm", "--rho", "0"], ["--rho"]),
    (["--mode", "ttq", "--t", "1.5"], ["--t"]),
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
def test_bad_arguments_exit_2_with_one_line(capsys, argv, words):
    code, err = exit_code_and_stderr(capsys, lambda: resolve(*argv))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:"), err
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
    (ValueError("--device cuda requested but CUDA is not available"), 2),
    (FileNotFoundError(2, "No such file or directory", "results/x.csv"), 2),
    (DivergenceError("loss became nan at epoch 1, step 3"), 3),
])
def test_run_main_expected_errors(capsys, restore_sigterm, error, code):
    def main():
        raise error

    exit_code, err = exit_code_and_stderr(capsys, lambda: cli.run_main(main))
    assert exit_code == code
    assert err.strip().splitlines() == [f"error: {error}"]


def test_run_main_lets_bugs_through(restore_sigterm):
    def main():
        raise KeyError("a programming error must keep its traceback")

    with pytest.raises(KeyError):
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
