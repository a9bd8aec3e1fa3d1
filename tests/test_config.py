"""quant/config.py: the table is the one declaration of every hyperparameter. Every script flag named after a
key takes its default and help from it, no default is written a second time anywhere in the code, values are
checked against each key's type and range, and a run config resolves defaults < tuned config < flags."""
import argparse
import ast
import runpy
import signal
import sys

import pytest

from conftest import REPO
from quant import config
from quant.config import KEYS, MODES, default_config, parse_keep_fp, resolve, tunable_keys, validate
from quant.errors import ConfigError
from quant.model import QUANT_LAYERS

SCRIPTS = ["train.py", "eval.py", "tune_hyperparams.py", "reproduce.py", "deployment_compression.py",
           "plot_results.py", "benchmarks/bench.py", "benchmarks/profile_step.py"]
# Flags named after a key that set something else: a search's or study's budget, the profiled batch, the
# precision the benchmark times besides FP32.
OWN_MEANING = {("tune_hyperparams.py", "epochs"), ("tune_hyperparams.py", "train_subset"),
               ("reproduce.py", "epochs"), ("reproduce.py", "train_subset"),
               ("benchmarks/profile_step.py", "batch_size"), ("benchmarks/bench.py", "precision")}


class Captured(Exception):
    pass


def script_parser(script, monkeypatch):
    """The ArgumentParser `script` builds, caught as its main() calls parse_args."""
    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [script])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except Captured as e:
        return e.args[0]
    finally:
        signal.signal(signal.SIGTERM, handler)
    pytest.fail(f"{script} never parsed its arguments")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_default_and_help_come_from_the_table(script, monkeypatch):
    parser = script_parser(script, monkeypatch)
    for action in parser._actions:
        key = KEYS.get(action.dest)
        if key is None or (script, action.dest) in OWN_MEANING:
            continue
        assert tuple(action.option_strings) == config.flags(key), (script, action.dest)
        assert action.default in (None, key.default), (script, action.dest, action.default)
        assert action.help == f"{key.help} (default: {config.describe_default(key)})", (script, action.dest)
    if script in ("train.py", "tune_hyperparams.py", "reproduce.py"):
        precision = next(a for a in parser._actions if a.dest == "precision")
        assert precision.choices == KEYS["precision"].type


def python_files():
    files = [*sorted((REPO / "quant").glob("*.py")), *sorted(REPO.glob("*.py")), *sorted((REPO / "benchmarks").glob("*.py"))]
    return [f for f in files if f.name != "config.py"]


def same_value(node, defaults) -> bool:
    if not isinstance(node, ast.Constant) or node.value is None:
        return False
    return any(node.value == d and isinstance(node.value, bool) == isinstance(d, bool) for d in defaults)


def written_defaults(path):
    """(line, key) of every place in `path` that writes a key's default again: a parameter default, a flag's
    default=, a class field, or a dict entry {"key": default}."""
    defaults = {name: list(k.default.values()) if isinstance(k.default, dict) else [k.default] for name, k in KEYS.items()}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            found += [(d.lineno, a.arg) for a, d in pairs if a.arg in defaults and same_value(d, defaults[a.arg])]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            if node.target.id in defaults and same_value(node.value, defaults[node.target.id]):
                found.append((node.lineno, node.target.id))
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value in defaults and same_value(v, defaults[k.value]):
                    found.append((node.lineno, k.value))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
            first = node.args[0]
            name = first.value.lstrip("-").replace("-", "_") if isinstance(first, ast.Constant) else None
            name = next((kw.value.value for kw in node.keywords if kw.arg == "dest"), name)
            default = next((kw.value for kw in node.keywords if kw.arg == "default"), None)
            if name in defaults and default is not None and same_value(default, defaults[name]):
                found.append((node.lineno, name))
    return sorted(found)


def test_no_default_is_written_twice():
    duplicates = [f"{path.relative_to(REPO)}:{line} {key}" for path in python_files() for line, key in written_defaults(path)]
    assert duplicates == [], "defaults written outside quant/config.py:\n" + "\n".join(duplicates)


def test_the_scan_finds_a_written_default(tmp_path):
    path = tmp_path / "example.py"
    path.write_text('def f(w, delta_factor=0.7, t=0.5):\n    return {"rho": 1e-4}\n'
                    'p.add_argument("--val-size", type=int, default=5000)\n'
                    'class Plan:\n    epochs: int = 3\n')
    assert written_defaults(path) == [(1, "delta_factor"), (2, "rho"), (3, "val_size"), (5, "epochs")]


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("name,good,bad", [
    ("lr", {"1e-3": 1e-3, 2: 2.0}, ["0", "-1", "nan", "inf", "abc", "", True, None]),
    ("batch_size", {"64": 64, 128.0: 128, "1e2": 100}, ["1", "0", "1.5", "x"]),
    ("t", {"0.5": 0.5, 1e-9: 1e-9}, ["0", "1", "1.5", "-0.1"]),
    ("warmup_frac", {"0": 0.0, "0.99": 0.99}, ["1", "-0.1"]),
    ("shift", {"0": 0, 3: 3}, ["-1", "2.5"]),
    ("per_channel", {"true": True, "0": False, False: False, "Yes": True}, ["maybe", "2"]),
    ("schedule", {"cosine": "cosine"}, ["linear", 1]),
    ("train_subset", {None: None, "100": 100}, ["0"]),
    ("keep_fp", {"last,first": ["conv1", "fc2"], "": [], ("fc1",): ["fc1"]}, ["conv9"]),
])
def test_validate(name, good, bad):
    mode = KEYS[name].mode or "fp"
    for value, expected in good.items():
        assert validate(mode, name, value) == expected
    for value in bad:
        with pytest.raises(ConfigError, match=name):
            validate(mode, name, value)


def test_keys_of_another_mode_are_refused():
    with pytest.raises(ConfigError, match=r"--rho \(a hyperparameter of --mode admm\) does not apply to --mode twn"):
        validate("twn", "rho", 0.1)
    with pytest.raises(ConfigError, match="unknown mode"):
        validate("bwn", "lr", 0.1)


def test_tunable_keys():
    assert tunable_keys("fp") == ["lr", "batch_size", "schedule", "weight_decay", "shift"]
    assert tunable_keys("ttq") == [*tunable_keys("fp"), "t", "scale_lr", "warmup_frac"]
    for mode in MODES:
        assert "epochs" not in tunable_keys(mode) and "precision" not in tunable_keys(mode)


def test_default_config_is_the_table():
    for mode in MODES:
        config_ = default_config(mode)
        assert config_["mode"] == mode and config_["precision"] == KEYS["precision"].default and config_["keep_fp"] == []
        assert set(config_) == {"mode", "hyperparams", *(n for n, k in KEYS.items() if k.mode is None)}
        assert config_["hyperparams"] == {n: k.default for n, k in KEYS.items() if k.mode == mode}
    assert default_config("ttq")["lr"] == KEYS["lr"].default["ttq"]
    default_config("fp")["keep_fp"].append("fc1")
    assert default_config("fp")["keep_fp"] == []  # every config gets its own copy
    assert default_config("admm", rho="0.5") == default_config("admm", hyperparams={"rho": 0.5})
    assert default_config("admm", rho="0.5")["hyperparams"]["rho"] == 0.5
    with pytest.raises(ConfigError, match="mode fp has no key 'bogus'"):
        default_config("fp", bogus=1)


@pytest.mark.parametrize("spec, expected", [
    ("first,last", ["conv1", "fc2"]),
    ("last,first", ["conv1", "fc2"]),  # always in forward order
    (" fc1 , first ", ["conv1", "fc1"]),
    ("first,conv1", ["conv1"]),  # an alias and its target count once
    ("conv2,,", ["conv2"]),
    ("", []),
    (None, []),
    ("conv1,conv2,fc1,fc2", list(QUANT_LAYERS)),
])
def test_parse_keep_fp(spec, expected):
    assert parse_keep_fp(spec) == expected


@pytest.mark.parametrize("spec", ["conv3", "first,fc3", "FIRST", "bn1"])
def test_parse_keep_fp_rejects_unknown_layers(spec):
    with pytest.raises(ConfigError) as err:
        parse_keep_fp(spec)
    for name in ("first", "last", *QUANT_LAYERS):
        assert name in str(err.value)


# ---------------------------------------------------------------- resolve: defaults < tuned config < flags
def test_precedence_defaults_then_base_then_flags():
    base = {"lr": 0.01, "batch_size": 64, "hyperparams": {"rho": 0.5}, "epochs": 99, "source": "a tuned config"}
    config_ = resolve("admm", {"batch_size": 32, "rho_growth": 2.0}, base)
    assert config_["lr"] == 0.01  # from base
    assert config_["batch_size"] == 32  # a flag beats base
    assert config_["epochs"] == KEYS["epochs"].default  # a tuned config sets only tunable keys
    assert config_["hyperparams"]["rho"] == 0.5 and config_["hyperparams"]["rho_growth"] == 2.0
    assert config_["hyperparams"]["admm_rounds"] == KEYS["admm_rounds"].default


@pytest.mark.parametrize("mode,given,words", [
    ("fp", {"rho": 1.0}, ["--rho", "admm"]),
    ("twn", {"t": 0.1}, ["--t", "ttq"]),
    ("fp", {"keep_fp": ["conv1"]}, ["--keep-fp"]),
    ("fp", {"train_subset": 100, "batch_size": 200}, ["--batch-size 200", "100 training images"]),
    ("fp", {"val_size": 60000}, ["--val-size"]),
])
def test_resolve_refuses(mode, given, words):
    with pytest.raises(ConfigError) as err:
        resolve(mode, given)
    for word in words:
        assert word in str(err.value)
