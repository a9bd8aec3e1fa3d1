"""The one representation of a trained model that every consumer reads.

Every method ends training by producing an *export*, a plain dict (safe for `torch.load(weights_only=True)`):

    {
      "ternary": {layer: {"codes": int8 tensor, weight's shape, values in {-1, 0, +1},
                          "w_p":   float32 [g]   positive level  (TWN/ADMM: alpha),
                          "w_n":   float32 [g]   negative level magnitude (TWN/ADMM: alpha),
                          "delta": float32 [g]   threshold used (for reporting)}},
      "float":   {state-dict key: tensor}  everything else of a plain LeNet5 (biases, BN, FP-kept weights)
    }

g is 1 (one scale per layer) or out_channels (per-output-channel scales). The deployed weight is
W = w_p * [codes == +1] - w_n * [codes == -1] (TTQ, arXiv 1612.01064, Eq. 6), so a layer takes at most
three values per scale group. eval, packing, tuning and plots all consume exactly this.
"""
import torch

from .errors import QuantError
from .model import LeNet5, QUANT_LAYERS
from .packing import code_counts, dequantize


class NotTernaryError(QuantError, ValueError):
    """A layer claimed ternary holds values other than {-w_n, 0, +w_p} in some scale group."""


def build_export(model: LeNet5, ternary: dict) -> dict:
    """Combine per-layer ternary entries {codes, w_p, w_n, delta} with the FP rest of `model` (quantizer state
    excluded), all as detached CPU copies: int8 codes, 1-D float32 scales."""
    vec = lambda v: torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1).cpu().clone()
    floats = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
              if ".quantizer." not in k and k.removesuffix(".weight") not in ternary}
    return {"ternary": {name: {"codes": e["codes"].detach().to(torch.int8).cpu().clone(),
                               "w_p": vec(e["w_p"]), "w_n": vec(e["w_n"]), "delta": vec(e["delta"])}
                        for name, e in ternary.items()}, "float": floats}


def check_ternary(export: dict) -> None:
    """Raise NotTernaryError unless every ternary layer is truly ternary per scale group."""
    for name, layer in export["ternary"].items():
        codes, w_p, w_n = layer["codes"], layer["w_p"], layer["w_n"]
        if codes.dtype != torch.int8 or not torch.isin(codes, torch.tensor([-1, 0, 1], dtype=torch.int8)).all():
            raise NotTernaryError(f"layer {name}: codes are not int8 values in {{-1, 0, +1}}")
        if w_p.numel() not in (1, codes.shape[0]) or w_n.numel() != w_p.numel():
            raise NotTernaryError(f"layer {name}: {w_p.numel()} scales do not match {codes.shape[0]} output channels")
        if not (torch.isfinite(w_p).all() and torch.isfinite(w_n).all()):
            raise NotTernaryError(f"layer {name}: non-finite scale")
        if (w_p < 0).any() or (w_n < 0).any():
            raise NotTernaryError(f"layer {name}: negative scale (w_p and w_n are magnitudes)")
        worst = max(len(torch.unique(row)) for row in dequantize(codes, w_p, w_n).reshape(w_p.numel(), -1))
        if worst > 3:
            raise NotTernaryError(f"layer {name}: {worst} distinct values in one scale group (max 3)")


def rebuild_model(export: dict) -> LeNet5:
    """A plain LeNet5 whose weights are exactly the exported codes x scales (and FP rest)."""
    check_ternary(export)
    state = dict(export["float"])
    for name, layer in export["ternary"].items():
        state[f"{name}.weight"] = dequantize(layer["codes"], layer["w_p"], layer["w_n"])
    model = LeNet5()
    model.load_state_dict(state, strict=True)
    return model.eval()


def layer_table(export: dict) -> list[dict]:
    """Per quantizable layer: shape, params, distinct values, % of -1/0/+1, bits/weight, delta and scales."""
    rows, nan = [], float("nan")
    for name in QUANT_LAYERS:
        layer = export["ternary"].get(name)
        weight = dequantize(layer["codes"], layer["w_p"], layer["w_n"]) if layer else export["float"][f"{name}.weight"]
        n = weight.numel()
        row = {"layer": name, "shape": "x".join(map(str, weight.shape)), "params": n,
               "distinct": int(torch.unique(weight).numel()), "bits": 2 if layer else 32}
        if layer:
            counts = code_counts(layer["codes"])
            row.update(neg_pct=100 * counts["-1"] / n, zero_pct=100 * counts["0"] / n, pos_pct=100 * counts["+1"] / n,
                       delta=layer["delta"].mean().item(), w_p=layer["w_p"].mean().item(),
                       w_n=layer["w_n"].mean().item(), groups=layer["w_p"].numel())
        else:
            row.update(neg_pct=nan, zero_pct=100 * (weight == 0).sum().item() / n, pos_pct=nan, delta=nan, w_p=nan,
                       w_n=nan, groups=0)
        rows.append(row)
    return rows


def size_summary(export: dict) -> dict:
    """Counts and theoretical storage of the four weight layers, ternary at 2 bits and FP-kept at 32 (biases/BN are
    counted in deployment.csv); zero_frac is measured on the deployed codes, never on latent weights."""
    model_params = sum(t.numel() for k, t in export["float"].items()
                       if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    ternary = sum(layer["codes"].numel() for layer in export["ternary"].values())
    fp_weights = sum(export["float"][f"{n}.weight"].numel() for n in QUANT_LAYERS if n not in export["ternary"])
    zeros = sum(code_counts(layer["codes"])["0"] for layer in export["ternary"].values())
    weights = ternary + fp_weights
    bits = 2 * ternary + 32 * fp_weights
    return {"total_params": model_params + ternary, "quantized_params": ternary, "bits_per_weight": bits / weights,
            "compression": 32 * weights / bits, "zero_frac": zeros / ternary if ternary else 0.0}
