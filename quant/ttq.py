"""TTQ: Trained Ternary Quantization. Zhu, Han, Mao, Dally, ICLR 2017, arXiv 1612.01064.

    delta = t * max|W|                                                    (Sec. 3, Eq. 9; t = 0.05)
    W^_i  = +w_p if W_i > delta, 0 if |W_i| <= delta, -w_n if W_i < -delta    (Eq. 6)
    dL/dw_p = sum_{i in I_p} dL/dW^_i,   dL/dw_n = - sum_{i in I_n} dL/dW^_i     (Eq. 7, sign corrected)
    dL/dW_i = w_p dL/dW^_i on I_p,  1 * dL/dW^_i on I_z,  w_n dL/dW^_i on I_n      (Eq. 8)

Eq. 7 as printed drops the minus sign of the w_n gradient (W^ = -w_n on I_n); several public ports
inherit that bug (TropComplique/trained-ternary-quantization#6). We use the chain rule, i.e. what
the official TensorFlow code gets through autodiff, and sums (not means) as the official code does.

w_p and w_n start at the least-squares scale of the weights, mean |W| over |W| > delta (TWN Eq. 5), not
the official code's 1.0: PyTorch's default init gives |W| ~ 0.01-0.1, and a level of 1.0 would multiply
each layer's output 10-100x in the first steps.

The authors fine-tune their CIFAR-10 models from trained FP ones (official code, tw-cifar10-resnet.py).
Within our fixed budget an optional FP warm-up does the same: the quantizer passes W through unchanged
(`active` False) for the first steps, then `start` sets w_p, w_n to the least-squares scale of the
warmed-up weights and ternarizes from then on.
"""
import torch
from torch import nn


def ttq_codes(w: torch.Tensor, t: float):
    """Return (codes int8, delta) with delta = t * max|W| (Eq. 9)."""
    w = w.detach()
    delta = t * w.abs().max()
    return ((w > delta).to(torch.int8) - (w < -delta).to(torch.int8)), delta


class TTQFunction(torch.autograd.Function):
    """Forward: Eq. 6. Backward: Eq. 8 for W (scaled STE) and sign-corrected Eq. 7 for w_p, w_n."""

    # The same codes as `ttq_codes`, computed for speed: delta from one aminmax pass (max|W| = max(max W, -min W)),
    # and the masks of I_p / I_n written as 1.0 / 0.0 floats (`torch.gt(..., out=float)`); on CPU bool masks,
    # torch.where and bool * float products cost 3-8x as much, on all 581k weights every step.

    @staticmethod
    def forward(ctx, w, w_p, w_n, t: float):
        w = w.detach()
        lo, hi = torch.aminmax(w)
        delta = t * torch.maximum(hi, -lo)
        pos = torch.gt(w, delta, out=torch.empty_like(w))
        neg = torch.lt(w, -delta, out=torch.empty_like(w))
        ctx.save_for_backward(pos, neg, w_p, w_n)
        return pos * w_p - neg * w_n

    @staticmethod
    def backward(ctx, grad_out):
        pos, neg, w_p, w_n = ctx.saved_tensors
        # w_p on I_p, w_n on I_n, 1 on I_z; exact, as at most one of the three terms is non-zero
        scale = pos * w_p + neg * w_n + (1 - pos - neg)
        grad_w = grad_out * scale
        grad_w_p = (grad_out * pos).sum().reshape(w_p.shape)
        grad_w_n = -(grad_out * neg).sum().reshape(w_n.shape)
        return grad_w, grad_w_p, grad_w_n, None


def least_squares_scale(w: torch.Tensor, t: float) -> torch.Tensor:
    """mean |W_i| over |W_i| > t * max|W|: the best single level for the codes of Eq. 9 (TWN Eq. 5)."""
    codes, _ = ttq_codes(w, t)
    nonzero = codes != 0
    return (w.detach().abs() * nonzero).sum() / nonzero.sum().clamp(min=1)


class TTQQuantizer(nn.Module):
    """Holds one layer's trainable positive scalars w_p, w_n (Sec. 3); passes W through until active."""

    def __init__(self, w: torch.Tensor, t: float, active: bool = True):
        super().__init__()
        self.t = t
        init = least_squares_scale(w, t).reshape(1)
        self.w_p = nn.Parameter(init.clone())
        self.w_n = nn.Parameter(init.clone())
        self.active = active

    @torch.no_grad()
    def start(self, w: torch.Tensor) -> None:
        """End the FP warm-up: w_p = w_n = the least-squares scale of the current W, ternary from now on."""
        self.w_p.fill_(least_squares_scale(w, self.t))
        self.w_n.copy_(self.w_p)
        self.active = True

    def forward(self, w):
        return TTQFunction.apply(w, self.w_p, self.w_n, self.t) if self.active else w

    def export(self, w) -> dict:
        if not self.active:
            raise RuntimeError("TTQ export during the FP warm-up: the layer is not ternary yet")
        codes, delta = ttq_codes(w, self.t)
        return {"codes": codes, "w_p": self.w_p, "w_n": self.w_n, "delta": delta}
