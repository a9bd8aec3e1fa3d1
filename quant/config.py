"""The run configuration: every hyperparameter declared once, in `KEYS`, and the config built from it.

The command-line flags and their help (quant/cli.py), config validation (`validate`), the tuner's keys
(`tunable_keys`) and a tuned config's merging (`resolve`) all read this table; library functions take every
value explicitly. A config is a flat dict of the training keys plus "mode" and "hyperparams" (the mode's own):

    {"mode": "ttq", "lr": 0.01, "batch_size": 64, ..., "keep_fp": [], "hyperparams": {"t": 0.05, ...}}
"""
import copy
import math
from dataclasses import dataclass
from typing import Any

from .admm import PENALTIES
from .engine import PRECISIONS, SCHEDULES
from .errors import ConfigError
from .model import QUANT_LAYERS

MODES = ("fp", "twn", "ttq", "admm")  # quant.methods.METHODS implements one class per name
MNIST_TRAIN = 60000


def parse_keep_fp(spec) -> list[str]:
    """'first,last' / 'conv1,fc2' (or a list of names) -> layer names kept in full precision, in forward order."""
    items = (str(s).strip() for s in (spec.split(",") if isinstance(spec, str) else spec or []))
    names = [{"first": QUANT_LAYERS[0], "last": QUANT_LAYERS[-1]}.get(item, item) for item in items if item]
    for name in (n for n in names if n not in QUANT_LAYERS):
        raise ConfigError(f"keep_fp: unknown layer {name!r} (choose from first, last, {', '.join(QUANT_LAYERS)})")
    return [n for n in QUANT_LAYERS if n in names]


@dataclass(frozen=True)
class Key:
    name: str
    default: Any  # one value, or {mode: value}
    type: Any  # int, float, bool, a tuple of allowed strings, or a function that parses and checks
    range: str | None  # "(0, 1)", "[0, 1)", "> 0", ">= 2": the allowed numbers, ends included by [ ] and >=
    help: str
    mode: str | None = None  # the one mode whose hyperparameter this is; None: every mode's training knob
    tunable: bool = False  # the tuner may search it (a tuned config may set it)
    flags: tuple = ()  # spellings replacing --name-with-dashes / --name_with_underscores

    def default_for(self, mode: str):
        return copy.deepcopy(self.default[mode] if isinstance(self.default, dict) else self.default)


KEYS = {k.name: k for k in [
    # Per-mode lr and batch size: chosen on the validation split (TWN's by the full-length, three-seed
    # confirmation stage of quant/confirm.py; report.md, "Confirming the short search at full length").
    Key("lr", {"fp": 3e-3, "twn": 1e-2, "ttq": 1e-2, "admm": 1e-2}, float, "> 0", "peak learning rate of Adam",
        tunable=True),
    Key("batch_size", {"fp": 128, "twn": 64, "ttq": 64, "admm": 64}, int, ">= 2",
        "mini-batch size, at least 2 for BatchNorm", tunable=True),
    Key("schedule", "onecycle", SCHEDULES, None, "LR schedule", tunable=True),
    Key("weight_decay", 0.0, float, ">= 0", "Adam L2 weight decay", tunable=True),
    Key("shift", 2, int, ">= 0", "augmentation: translate each training image by up to N pixels, 0 = off",
        tunable=True),
    # auto: bf16 and FP32 training scored within noise of each other on validation for every mode (report.md,
    # "Training precision"), and bf16 is faster where the hardware has it.
    Key("precision", "auto", PRECISIONS, None,
        "forward-pass precision; bf16 runs it under torch.autocast, auto = bf16 where the device has native bf16"),
    Key("epochs", 3, int, ">= 1", "training epochs"),
    Key("seed", 0, int, ">= 0", "random seed: initialisation, validation split, batch order"),
    Key("val_size", 5000, int, ">= 0", "training images held out for validation (a random split per seed)"),
    Key("train_subset", None, int, ">= 1", "train on only the first N images of the training split (quick runs)"),
    Key("keep_fp", [], parse_keep_fp, None, "layers left full precision: first, last, or names (conv1,conv2,fc1,fc2)"),
    # TWN, arXiv 1605.04711: 0.7 is the constant of the authors' Caffe code; v3 of the paper writes 0.75 (Eq. 6).
    Key("delta_factor", 0.7, float, "(0, 1)", "TWN: delta = f * mean|W|; v3 of the paper writes f = 0.75", "twn", True),
    Key("per_channel", False, bool, None, "TWN: delta and alpha per output channel (paper v3, Alg. 1)", "twn", True),
    # TTQ, arXiv 1612.01064: t = 0.05 (Sec. 3, Eq. 9); w_p, w_n at the weights' lr as in the official code.
    Key("t", 0.05, float, "(0, 1)", "TTQ: delta = t * max|W|", "ttq", True, ("--t", "--threshold")),
    Key("scale_lr", 1.0, float, "> 0", "TTQ: lr multiplier for w_p, w_n", "ttq", True),
    Key("warmup_frac", 0.3, float, "[0, 1)", "TTQ: first fraction of steps trained in full precision, then ternary; "
        "0 = off", "ttq", True),
    # ADMM, arXiv 1707.09870 (Eqs. 8-11); the schedule is explained in quant/admm.py.
    Key("rho", 1e-4, float, "> 0", "ADMM: initial penalty rho", "admm", True),
    Key("rho_growth", 1.2, float, "> 0", "ADMM: rho multiplier per ADMM round", "admm", True),
    Key("admm_rounds", 46, int, ">= 1", "ADMM: G/U updates (each growing rho), spread evenly over the steps "
        "before the fine-tune", "admm", True),
    Key("finetune_frac", 0.1, float, "[0, 1)", "ADMM: final fraction of steps trained with codes frozen (alpha, BN, "
        "biases); 0 = off", "admm", True),
    Key("penalty", "prox", PENALTIES, None, "ADMM: rho/2 ||W - G + U||^2 as a proximal step after each Adam step "
        "(prox) or inside the loss (loss)", "admm", True, ("--admm-penalty", "--admm_penalty")),
]}


def flags(key: Key) -> tuple:
    """The command-line spellings of `key`: kebab-case first, the seed study's underscore spelling as an alias."""
    return key.flags or tuple(dict.fromkeys([f"--{key.name.replace('_', '-')}", f"--{key.name}"]))


def _in_range(number: float, spec: str) -> bool:
    if spec[0] == ">":
        return number >= float(spec[2:]) if spec[1] == "=" else number > float(spec[1:])
    low, high = (float(s) for s in spec[1:-1].split(","))
    return (low <= number if spec[0] == "[" else low < number) and (number <= high if spec[-1] == "]" else number < high)


def check(key: Key, value):
    """`value` (a command-line string, a JSON value or a Python one) as `key`'s type; ValueError (without the
    key's name, for argparse to prefix its flag) if it is not one, or out of range."""
    if value is None and key.default is None:
        return None
    if isinstance(key.type, tuple):
        if value not in key.type:
            raise ValueError(f"{value!r} is not one of {', '.join(key.type)}")
        return value
    if key.type is bool:
        text = str(value).lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{value!r} is not one of False, True")
        return text in ("true", "1", "yes")
    if key.type not in (int, float):
        return key.type(value)
    try:
        number = float(None if isinstance(value, bool) else value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{value!r} is not {'an integer' if key.type is int else 'a number'}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be finite, got {value!r}")
    if key.type is int and not number.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    if not _in_range(number, key.range):
        raise ValueError(f"must be {'in ' if key.range[0] in '([' else ''}{key.range}, got {value!r}")
    return int(number) if key.type is int else number


def checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    return mode


def validate(mode: str, name: str, value):
    """`value` checked and converted for key `name` of `mode`; a ConfigError names the key ("lr: must be > 0")."""
    key = KEYS.get(name)
    if key is not None and key.mode not in (None, checked_mode(mode)):
        raise ConfigError(f"{flags(key)[0]} (a hyperparameter of --mode {key.mode}) does not apply to --mode {mode}")
    if key is None:
        valid = [k for k, spec in KEYS.items() if spec.mode in (None, checked_mode(mode))]
        raise ConfigError(f"mode {mode} has no key {name!r} (valid: {', '.join(valid)})")
    try:
        return check(key, value)
    except ConfigError:  # parse_keep_fp's message names the key already
        raise
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def tunable_keys(mode: str) -> list[str]:
    """Keys the tuner may search for `mode`: the tunable training knobs, then the mode's own hyperparameters."""
    return [name for name, key in KEYS.items() if key.tunable and key.mode in (None, checked_mode(mode))]


def knobs(config: dict) -> dict:
    """The tunable part of a config (what a tuned config sets): training knobs and method hyperparameters."""
    return {**{k: config[k] for k in tunable_keys("fp")}, "hyperparams": dict(config["hyperparams"])}


def hyperparams(mode: str) -> dict:
    return {name: key.default_for(mode) for name, key in KEYS.items() if key.mode == checked_mode(mode)}


def default_config(mode: str, **overrides) -> dict:
    """The full config of `mode` at the table's defaults, then `overrides` (each checked; a method
    hyperparameter may be given by name or inside overrides["hyperparams"])."""
    config = {"mode": checked_mode(mode), **{n: k.default_for(mode) for n, k in KEYS.items() if k.mode is None},
              "hyperparams": hyperparams(mode)}
    for name, value in {**overrides, **overrides.get("hyperparams", {})}.items():
        if name != "hyperparams":
            value = validate(mode, name, value)
            (config["hyperparams"] if KEYS[name].mode else config)[name] = value
    return config


def resolve(mode: str, given: dict, base: dict | None = None) -> dict:
    """train.py's config: the table's defaults < `base`'s tunable keys (a tuned config) < `given` (flags). Refuses
    a key of another mode, --keep-fp with --mode fp, and a batch larger than MNIST's training images."""
    tuned = {**(base or {}), **(base or {}).get("hyperparams", {})}
    config = default_config(mode, **{**{k: v for k, v in tuned.items() if k in KEYS and KEYS[k].tunable}, **given})
    if mode == "fp" and config["keep_fp"]:
        raise ConfigError("--keep-fp is meaningless with --mode fp (every layer is FP)")
    if config["val_size"] >= MNIST_TRAIN:
        raise ConfigError(f"--val-size must be < {MNIST_TRAIN}")
    available = config["train_subset"] or MNIST_TRAIN - config["val_size"]
    if config["batch_size"] > available:
        raise ConfigError(f"--batch-size {config['batch_size']} is larger than the {available} training images")
    return config


def describe_default(key: Key) -> str:
    """The default as help text shows it ("fp 0.003, twn 0.003, ..." where each mode has its own)."""
    def show(v):
        return ({True: "on", False: "off"}[v] if isinstance(v, bool) else "all" if v is None else
                "none" if v == [] else f"{v:g}" if isinstance(v, float) else str(v))

    if isinstance(key.default, dict):
        return ", ".join(f"{m} {show(v)}" for m, v in key.default.items())
    return show(key.default)
