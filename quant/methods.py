"""The method registry: what each mode attaches to LeNet-5, adds to the loss, does per step and exports.

    METHODS = {"fp": FP, "twn": TWN, "ttq": TTQ, "admm": ADMM}

Each method sees the model only through the hooks the training engine calls: `attach` (before the optimizer
is built), `param_groups`, `extra_loss` (per step), `after_step`, `epoch_stats` (per epoch), `finish` (end of
training) and `export` (the one ternary representation, quant/export.py). The math of each method is in its
own module: quant/twn.py, quant/ttq.py, quant/admm.py.
"""
import torch

from . import admm, config, ttq, twn
from .export import build_export
from .model import LeNet5


class Method:
    """Full precision: no quantizer, the export keeps every weight in FP32."""

    name = "fp"

    def __init__(self, keep_fp: list, hparams: dict):
        self.keep_fp, self.hparams = list(keep_fp), hparams
        self.layers = {}  # name -> quantized layer, set by attach

    def quantized(self, model: LeNet5):
        return [] if self.name == "fp" else [(n, l) for n, l in model.quant_layers() if n not in self.keep_fp]

    def attach(self, model: LeNet5) -> None:
        self.layers = dict(self.quantized(model))

    def ternary(self) -> bool:
        """Whether the forward pass runs on ternary weights now."""
        return self.name != "fp" and bool(self.layers)

    def param_groups(self, model: LeNet5) -> list[dict]:
        """Optimizer groups as {"params": [...], "lr_mult": m}; the engine uses lr * m for each."""
        return [{"params": list(model.parameters()), "lr_mult": 1.0}]

    def extra_loss(self):
        return None

    def after_step(self, model: LeNet5, step: int, total_steps: int) -> None:
        pass

    def epoch_stats(self) -> dict:
        # val_ternary: 1 if this epoch's validation point was measured with ternary weights, 0 if with full
        # precision ones (FP; TTQ during its warm-up; ADMM before its projection).
        return {"val_ternary": int(self.ternary())}

    def finish(self, model: LeNet5, recalibration_batches) -> None:
        pass

    def export(self, model: LeNet5) -> dict:
        return build_export(model, {n: layer.quantizer.export(layer.weight) for n, layer in self.quantized(model)})


class FP(Method):
    name = "fp"


class TWN(Method):
    name = "twn"

    def attach(self, model):
        super().attach(model)
        for layer in self.layers.values():
            layer.quantizer = twn.TWNQuantizer(self.hparams["delta_factor"], self.hparams["per_channel"])


class TTQ(Method):
    name = "ttq"

    def attach(self, model):
        super().attach(model)
        warm = self.hparams["warmup_frac"] > 0
        for layer in self.layers.values():
            layer.quantizer = ttq.TTQQuantizer(layer.weight, self.hparams["t"], active=not warm)

    def ternary(self):
        return any(layer.quantizer.active for layer in self.layers.values())

    def param_groups(self, model):
        # scale_lr multiplies the lr of w_p and w_n (the official code trains them at the weights' lr).
        scales = [p for layer in self.layers.values() for p in (layer.quantizer.w_p, layer.quantizer.w_n)]
        ids = {id(p) for p in scales}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": rest, "lr_mult": 1.0}, {"params": scales, "lr_mult": self.hparams["scale_lr"]}]

    @torch.no_grad()
    def after_step(self, model, step, total_steps):
        for layer in self.layers.values():
            if not layer.quantizer.active:
                if step >= int(self.hparams["warmup_frac"] * total_steps):
                    layer.quantizer.start(layer.weight)  # the FP warm-up is over
                continue
            # w_p and w_n are positive by definition (Sec. 3); a large step could push one through zero.
            layer.quantizer.w_p.clamp_(min=1e-8)
            layer.quantizer.w_n.clamp_(min=1e-8)


class ADMM(Method):
    """ADMM training of latent W (quant/admm.py: its state, projection and schedule), then an optional short
    fine-tune of alpha, BN and biases with the codes frozen."""

    name = "admm"

    def attach(self, model):
        super().attach(model)
        self.state = admm.ADMMState(self.layers, self.hparams["rho"], self.hparams["rho_growth"])
        self.frozen = {n: admm.FrozenTernary(self.state.codes[n], self.state.alpha[n]) for n in self.layers}
        self.finetuning = False

    def ternary(self):
        return self.finetuning and bool(self.layers)

    def param_groups(self, model):
        # alpha, one scalar per layer that Adam moves by ~lr per step, trains at a tenth of the lr.
        alphas = [f.alpha for f in self.frozen.values()]
        ids = {id(a) for a in alphas}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": rest, "lr_mult": 1.0}, {"params": alphas, "lr_mult": 0.1}]

    def extra_loss(self):
        return None if self.finetuning or self.hparams["penalty"] == "prox" else self.state.penalty()

    @torch.no_grad()
    def after_step(self, model, step, total_steps):
        if self.finetuning:
            for f in self.frozen.values():
                f.alpha.clamp_(min=1e-8)
            return
        if self.hparams["penalty"] == "prox":
            self.state.prox_step()
        action = admm.schedule(step, total_steps, self.hparams["admm_rounds"], self.hparams["finetune_frac"])
        if action == "round":
            self.state.update()
        elif action == "freeze":
            self._freeze()

    def _freeze(self):
        """Hard-project W <- Pi(W) and switch every quantized layer to its frozen codes."""
        self.final_residual = self.state.primal_residual()  # ||W - G|| / ||W|| just before the projection
        for name, layer in self.layers.items():
            codes, alpha, delta = admm.project_ternary(layer.weight)
            layer.weight.copy_(codes.to(layer.weight.dtype) * alpha)
            self.frozen[name].codes.copy_(codes)
            self.frozen[name].alpha.copy_(alpha.reshape(1))
            self.state.delta[name] = delta
            layer.quantizer = self.frozen[name]
        self.finetuning = True

    def epoch_stats(self):
        # Once the codes are frozen W = G by construction; report the residual the projection closed.
        residual = self.final_residual if self.finetuning else self.state.primal_residual()
        return {**super().epoch_stats(), "primal_residual": residual, "rho": self.state.rho}

    @torch.no_grad()
    def finish(self, model, recalibration_batches):
        if not self.finetuning:
            self._freeze()
            recalibrate_bn(model, recalibration_batches)

    def export(self, model):
        if not self.finetuning:
            raise RuntimeError("ADMM.export before finish(): the codes are not final yet")
        entries = {name: {**self.frozen[name].export(layer.weight), "delta": self.state.delta[name]}
                   for name, layer in self.layers.items()}
        return build_export(model, entries)


@torch.no_grad()
def recalibrate_bn(model: LeNet5, batches) -> None:
    """Re-estimate BN running statistics for the current (projected) weights (cumulative average)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x, _ in batches:
        model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    model.eval()


METHODS = {m.name: m for m in (FP, TWN, TTQ, ADMM)}  # the names of config.MODES


def get_method(mode: str, keep_fp=(), **hparams) -> Method:
    """The method for `mode` with its hyperparameters: the table's defaults (quant/config.py) updated by
    `hparams`, each checked; an unknown mode or hyperparameter names the valid ones."""
    full = config.default_config(mode, hyperparams=hparams)["hyperparams"]
    return METHODS[mode](config.parse_keep_fp(keep_fp), full)
