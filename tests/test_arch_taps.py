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


def test_deeper_units_keep_the_taps_and_cost_more():
    """``depth`` (bench/pipeline.py --depth): extra convs before each tapped conv change the
    teacher's cost, not its taps; depth 1 is the network (state dict, manifest args) of before,
    and a student is one conv per unit."""
    from amalgam.engine.evaluate import count_macs

    cfg = CNNConfig(conv_widths=[8, 16], fc_widths=[32], num_classes=5)
    deep_cfg = cfg.model_copy(update={"depth": 3})
    plain, deep = TappedCNN(cfg), TappedCNN(deep_cfg)
    assert "depth" not in cfg.model_dump() and deep_cfg.model_dump()["depth"] == 3
    assert CNNConfig(**deep_cfg.model_dump()) == deep_cfg
    assert not any(k.startswith("deep.") for k in plain.state_dict())
    assert [(i.name, i.path, i.channels) for i in deep.feature_info()] == [(i.name, i.path, i.channels) for i in plain.feature_info()]
    x = torch.rand(2, 1, 28, 28)
    with TapCapture(deep, ["layers.conv1", "layers.conv2"]) as cap:
        _, feats = cap.run(deep, x)
    assert feats["layers.conv1"].shape == (2, 8, 28, 28) and feats["layers.conv2"].shape == (2, 16, 14, 14)
    # The tap is the last conv of its unit, after the unit's extra convs.
    with torch.no_grad():
        again = deep.layers["conv2"](deep.deep["conv2"](deep.pres["conv2"](feats["layers.conv1"])))
    assert torch.allclose(feats["layers.conv2"], again)
    assert count_macs(deep, (1, 28, 28)) > 3 * count_macs(plain, (1, 28, 28))
    assert deep_cfg.for_student([4, 4, 4, 5]).depth == 1


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
