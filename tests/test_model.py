"""quant/model.py: LeNet-5's shapes and parameter counts recomputed from the architecture table, and the
quantizer hook checked against a plain conv/linear on the transformed weight."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.model import QUANT_LAYERS, LeNet5, QuantConv2d, QuantLinear

# TWN paper Table 1 / the seed study: (name, out, in, kernel) per weight layer; fc1 sees 64 maps of 4x4.
ARCH = [("conv1", 32, 1, 5), ("conv2", 64, 32, 5), ("fc1", 512, 64 * 4 * 4, 1), ("fc2", 10, 512, 1)]


def test_quantizable_weight_count_is_581408():
    by_hand = sum(out * inp * k * k for _, out, inp, k in ARCH)
    assert by_hand == 581_408
    model = LeNet5()
    assert sum(layer.weight.numel() for _, layer in model.quant_layers()) == 581_408
    biases = sum(out for _, out, _, _ in ARCH)
    bn_affine = 2 * (32 + 64)
    assert sum(p.numel() for p in model.parameters()) == by_hand + biases + bn_affine


def test_layer_shapes_and_order():
    model = LeNet5()
    assert [name for name, _ in model.quant_layers()] == list(QUANT_LAYERS) == [a[0] for a in ARCH]
    for (name, layer), (_, out, inp, k) in zip(model.quant_layers(), ARCH):
        expected = (out, inp, k, k) if name.startswith("conv") else (out, inp)
        assert tuple(layer.weight.shape) == expected, name


@pytest.mark.parametrize("n", [1, 2, 5])
def test_output_shape(n):
    torch.manual_seed(0)
    model = LeNet5().eval()
    out = model(torch.randn(n, 1, 28, 28))
    assert out.shape == (n, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_forward_matches_functional_reference():
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.randn(3, 1, 28, 28)
    m = model

    def bn(t, b):
        return F.batch_norm(t, b.running_mean, b.running_var, b.weight, b.bias, training=False, eps=b.eps)

    h = F.max_pool2d(F.relu(bn(F.conv2d(x, m.conv1.weight, m.conv1.bias), m.bn1)), 2)
    h = F.max_pool2d(F.relu(bn(F.conv2d(h, m.conv2.weight, m.conv2.bias), m.bn2)), 2)
    h = F.relu(h.reshape(3, -1) @ m.fc1.weight.T + m.fc1.bias)
    torch.testing.assert_close(model(x), h @ m.fc2.weight.T + m.fc2.bias)


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, w):
        return w.sign() * self.factor


@pytest.mark.parametrize("layer_cls", [QuantConv2d, QuantLinear])
def test_quantizer_replaces_weight_in_forward_and_backward(layer_cls):
    torch.manual_seed(0)
    if layer_cls is QuantConv2d:
        layer, x, op = QuantConv2d(2, 3, 3), torch.randn(2, 2, 6, 6), F.conv2d
    else:
        layer, x, op = QuantLinear(4, 3), torch.randn(2, 4), F.linear
    plain = op(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), plain)  # no quantizer: an ordinary layer
    layer.quantizer = Scale(0.5)
    torch.testing.assert_close(layer(x), op(x, layer.weight.sign() * 0.5, layer.bias))
    assert "quantizer.factor" not in dict(layer.named_parameters())  # a plain attribute module, no params
    # sign() has zero gradient, so the latent weight gets none through this quantizer; the bias still does.
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.weight.grad) == 0 and layer.bias.grad.abs().sum() > 0


def test_pool_before_relu_gives_the_same_gradients():
    """relu(maxpool(z)) == maxpool(relu(z)): the model's cheaper order changes neither outputs nor gradients."""
    torch.manual_seed(0)
    model = LeNet5().train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    m = model

    def relu_first(t):
        t = F.max_pool2d(F.relu(m.bn1(m.conv1(t))), 2)
        t = F.max_pool2d(F.relu(m.bn2(m.conv2(t))), 2)
        return m.fc2(F.relu(m.fc1(t.flatten(1))))

    grads = []
    for forward in (model, relu_first):
        model.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_conv_weights_stay_channels_last_under_a_quantizer():
    """conv1 (one input channel) has ambiguous strides; elementwise ops hand back NCHW ones, which would send
    the convolution, BN and pooling down their slower NCHW paths. The layer restores the weight's strides."""
    model = LeNet5()
    conv1 = model.conv1
    assert conv1.weight.is_contiguous(memory_format=torch.channels_last)
    conv1.quantizer = Scale(0.1)
    assert conv1.quantizer(conv1.weight).stride() != conv1.weight.stride()  # the case the layer repairs
    x = torch.randn(2, 1, 28, 28)
    out = conv1(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, F.conv2d(x, conv1.weight.sign() * 0.1, conv1.bias))
    conv1.quantizer = Half()  # a quantizer with a gradient: the restriding copy must pass it on
    w = conv1.weight.detach().clone().requires_grad_(True)
    conv1(x).square().sum().backward()
    F.conv2d(x, w * 0.5, conv1.bias.detach()).square().sum().backward()
    torch.testing.assert_close(conv1.weight.grad, w.grad)


class Half(nn.Module):
    def forward(self, w):
        return w * 0.5
