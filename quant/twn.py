"""TWN: Ternary Weight Networks. Li, Zhang, Liu (2016), arXiv 1605.04711.

    T_i   = +1 if W_i > delta, 0 if |W_i| <= delta, -1 if W_i < -delta     (Eq. 3)
    delta = delta_factor * mean|W|                                        (Eq. 6 approximation)
    alpha = mean of |W_i| over I_delta = {i : |W_i| > delta}             (Eq. 5)
    forward uses alpha * T; backward passes dL/d(alpha T) straight to the latent W (Sec. 2.4, Alg. 1).

The project's default delta_factor is the constant of the authors' original Caffe code (TERNARY_DELTA = 7 / 10)
and of most reimplementations; v3 of the paper writes 0.75 (the Gaussian optimum). Both are options.
Per layer by default (the v1 Caffe code); `per_channel=True` computes delta and alpha per output filter
(v3, Algorithm 1). delta and alpha are recomputed every forward pass and carry no gradient.
"""
import torch
from torch import nn


def _reduce_dims(w: torch.Tensor, per_channel: bool):
    return tuple(range(1, w.ndim)) if per_channel else tuple(range(w.ndim))


def twn_ternarize(w: torch.Tensor, delta_factor: float, per_channel: bool):
    """Return (codes int8, alpha [g], delta [g]) for weight `w` by Eqs. 3, 5, 6 (g = 1 or out channels).

    A group with no |W| > delta (all-zero weights) gets alpha = 0 instead of 0/0.
    """
    dims = _reduce_dims(w, per_channel)
    a = w.detach().abs()
    delta = delta_factor * a.mean(dim=dims, keepdim=True)
    mask = a > delta
    count = mask.sum(dim=dims, keepdim=True)
    alpha = (a * mask).sum(dim=dims, keepdim=True) / count.clamp(min=1)
    codes = (torch.sign(w.detach()) * mask).to(torch.int8)
    return codes, alpha.reshape(-1), delta.reshape(-1)


def twn_weight(w: torch.Tensor, delta_factor: float, per_channel: bool) -> torch.Tensor:
    """alpha * T(W) as a float tensor: the values of `twn_ternarize`'s codes * alpha, computed for training speed.

    The mask is written as 1.0 / 0.0 floats (`torch.gt(..., out=float)`): on CPU a bool mask, its conversion
    and bool * float products cost ~4x as much, and this runs on all 581k weights every step.
    """
    dims = _reduce_dims(w, per_channel)
    a = w.detach().abs()
    delta = delta_factor * a.mean(dim=dims, keepdim=True)
    mask = torch.gt(a, delta, out=torch.empty_like(a))
    alpha = (a * mask).sum(dim=dims, keepdim=True) / mask.sum(dim=dims, keepdim=True).clamp(min=1)
    return torch.copysign(mask.mul_(alpha), w.detach())  # +-alpha where |W| > delta, 0 elsewhere


class TernarizeSTE(torch.autograd.Function):
    """Forward: alpha * T(W) (TWN Eqs. 3-6). Backward: dL/dW = dL/d(alpha T), the identity straight-through estimator."""

    @staticmethod
    def forward(ctx, w, delta_factor: float, per_channel: bool):
        return twn_weight(w, delta_factor, per_channel)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None


class TWNQuantizer(nn.Module):
    """Stateless TWN weight quantizer attached to a QuantConv2d/QuantLinear."""

    def __init__(self, delta_factor: float, per_channel: bool):
        super().__init__()
        self.delta_factor, self.per_channel = delta_factor, per_channel

    def forward(self, w):
        return TernarizeSTE.apply(w, self.delta_factor, self.per_channel)

    def export(self, w) -> dict:
        codes, alpha, delta = twn_ternarize(w, self.delta_factor, self.per_channel)
        return {"codes": codes, "w_p": alpha, "w_n": alpha, "delta": delta}
