import pytest
import torch
from torch import nn

from amalgam.engine.capture import TapCapture, capture_teachers
from amalgam.errors import AmalgamError
from amalgam.zoo.arch import CNNConfig, TappedCNN
from amalgam.zoo.manifest import load_zoo


def test_feature_info_describes_every_tap():
    net = TappedCNN(CNNConfig(conv_widths=[8, 16, 32], fc_widths=[64], num_classes=5))
    info = net.feature_info()
    assert [(i.name, i.path, i.kind, i.channels, i.stride) for i in info] == [
        ("conv1", "layers.conv1", "conv", 8, 1),
        ("conv2", "layers.conv2", "conv", 16, 2),
        ("conv3", "layers.conv3", "conv", 32, 4),
        ("fc1", "layers.fc1", "fc", 64, 0),
        ("head", "layers.head", "fc", 5, 0),
    ]
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 5)


def test_taps_are_pre_activation(tiny_zoo):
    _, teachers = load_zoo(tiny_zoo)
    x = torch.rand(4, 1, 28, 28)
    logits, feats = capture_teachers(teachers, x)
    t = teachers[0]
    # Manual forward, layer by layer.
    h = t.normalize(x)
    conv1 = t.net.layers.conv1(h)
    conv2 = t.net.layers.conv2(nn.functional.max_pool2d(torch.relu(conv1), 2))
    assert torch.equal(feats[0]["conv1"], conv1)
    assert torch.equal(feats[0]["conv2"], conv2)
    assert (feats[0]["conv1"] < 0).any()  # pre-activation: negatives survive
    assert torch.allclose(logits[0], t(x))
    assert not feats[0]["conv1"].requires_grad


class _InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.conv(x))


def test_inplace_after_tap_fails_loudly():
    net = _InplaceNet()
    with torch.no_grad(), TapCapture(net, ["conv"], owner="teacher bad") as cap:
        with pytest.raises(AmalgamError, match=r"teacher bad: tap conv was modified in place"):
            cap.run(net, torch.randn(1, 1, 5, 5))


def test_unknown_tap_path():
    with pytest.raises(AmalgamError, match=r"no module at tap path 'layers.nope'"):
        TapCapture(TappedCNN(CNNConfig(conv_widths=[4], num_classes=2)), ["layers.nope"])
