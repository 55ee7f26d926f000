"""Layer-wise stages and FAM folding: exactness of the fold, independence of stages, closed-form stage 1."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from amalgam.engine.amalgamate import TapStats, fit_pca
from amalgam.engine.capture import capture_teachers
from amalgam.engine.fold import fam_matrix, fold_into
from amalgam.engine.stages import (
    LstsqStats,
    StageNet,
    assemble,
    build_stages,
    conv_patches,
    fit_stages,
    normalised_mse,
    stage_specs,
)
from amalgam.zoo.arch import CNNConfig, TappedCNN
from amalgam.zoo.manifest import InputSpec, TapSpec, Teacher, TeacherEntry

CFG = CNNConfig(conv_widths=[4, 6, 5], fc_widths=[8], num_classes=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: nn.Module, gen: torch.Generator, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in**0.5)


def _random_stages(seed: int = 0) -> tuple[TappedCNN, dict[str, StageNet]]:
    torch.manual_seed(seed)
    student = TappedCNN(CFG)
    nets = build_stages(student)
    gen = torch.Generator().manual_seed(seed + 100)
    for net in nets.values():
        _randomise(net.layer, gen, scale=1.0)
        if net.fam is not None:
            with torch.no_grad():  # far from identity, with a bias
                c = net.fam.weight.shape[0]
                a = torch.eye(c) + 0.7 * torch.randn(c, c, generator=gen)
                net.fam.weight.copy_(a.view_as(net.fam.weight))
                net.fam.bias.copy_(torch.randn(c, generator=gen))
    return student, nets


def _unfolded(student: TappedCNN, nets: dict[str, StageNet]) -> TappedCNN:
    """The student with every stage's layer copied in, FAMs not folded."""
    out = copy.deepcopy(student)
    for n in out.unit_names:
        out.layers[n].load_state_dict(nets[n].layer.state_dict())
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(((a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))).item())


# --- stage construction ----------------------------------------------------------------


def test_build_stages_mirror_the_student_with_identity_fams():
    torch.manual_seed(0)
    student = TappedCNN(CFG)
    specs = stage_specs(student)
    assert [(s.name, s.input_tap, s.target_tap) for s in specs] == [
        ("conv1", None, "conv1"), ("conv2", "conv1", "conv2"), ("conv3", "conv2", "conv3"),
        ("fc1", "conv3", "fc1"), ("head", "fc1", "head"),
    ]
    nets = build_stages(student)
    assert nets["conv1"].fam is None
    assert isinstance(nets["conv2"].fam, nn.Conv2d) and nets["conv2"].fam.kernel_size == (1, 1)
    assert isinstance(nets["fc1"].fam, nn.Conv2d) and nets["fc1"].fam.in_channels == 5  # reads conv3's code
    assert isinstance(nets["head"].fam, nn.Linear) and nets["head"].fam.in_features == 8
    # Stages start from the student's layers (copies, not shared) and an identity FAM.
    assert torch.equal(nets["conv2"].layer.weight, student.layers["conv2"].weight)
    assert nets["conv2"].layer.weight.data_ptr() != student.layers["conv2"].weight.data_ptr()
    x = torch.randn(3, 4, 28, 28)
    with torch.no_grad():
        assert torch.equal(nets["conv2"](x), student.forward_unit("conv2", x))
    # With identity FAMs, assembling gives back the student's function.
    with torch.no_grad():
        img = torch.randn(2, 1, 28, 28)
        assert torch.allclose(assemble(student, nets)(img), student(img), atol=1e-6)


# --- folding ---------------------------------------------------------------------------


def test_assemble_folds_each_fam_into_the_layer_before_exactly():
    student, nets = _random_stages(0)
    before = copy.deepcopy(student.state_dict())
    assembled = assemble(student, nets)
    unfolded = _unfolded(student, nets)
    names = student.unit_names
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        # Inputs of every layer, from a real forward pass of the unfolded net.
        x = torch.randn(4, 1, 28, 28, generator=gen)
        inputs, h = {}, x
        for n in names:
            inputs[n] = unfolded.pres[n](h)
            h = unfolded.layers[n](inputs[n])
        for i in range(1, len(names)):
            prev, n = names[i - 1], names[i]
            got = assembled.layers[prev](inputs[prev])
            want = nets[n].fam(unfolded.layers[prev](inputs[prev]))
            assert got.shape == want.shape
            assert _close(got, want), (prev, n, float((got - want).abs().max()))
            # ... and the fold really changed the layer (the FAMs are far from identity).
            assert not _close(got, unfolded.layers[prev](inputs[prev]), 1e-2)
        # The head has no FAM after it: unchanged by assembly.
        assert torch.equal(assembled.layers["head"].weight, nets["head"].layer.weight)

        # End to end: the assembled net is the chain of stages, each fed the previous stage's output.
        z = nets[names[0]](x)
        for n in names[1:]:
            z = nets[n](z)
        logits = assembled(x)
        assert logits.shape == (4, 5)
        assert _close(logits, z), float((logits - z).abs().max())
        assert not _close(logits, unfolded(x), 1e-2)
    # The input student is not modified.
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_into_conv_and_linear_and_refusals():
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    fam = nn.Conv2d(4, 4, 1)
    _randomise(conv, gen)
    _randomise(fam, gen)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    with torch.no_grad():
        want = fam(conv(x))
        folded = copy.deepcopy(conv)
        fold_into(folded, fam)
        assert _close(folded(x), want, 1e-6)
        lin, lfam = nn.Linear(6, 3), nn.Linear(3, 3)
        _randomise(lin, gen)
        _randomise(lfam, gen)
        v = torch.randn(5, 6, generator=gen)
        want = lfam(lin(v))
        fold_into(lin, lfam)
        assert _close(lin(v), want, 1e-6)
    a, c = fam_matrix(nn.Linear(3, 3, bias=False))
    assert a.shape == (3, 3) and torch.equal(c, torch.zeros(3))
    with pytest.raises(ValueError, match="1x1"):
        fam_matrix(nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match="cannot fold a ReLU"):
        fam_matrix(nn.ReLU())


def test_a_refused_fold_leaves_the_layer_untouched():
    layer = nn.Linear(3, 2, bias=False)
    fam = nn.Linear(2, 2)
    with torch.no_grad():
        fam.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="needs a layer with a bias"):
        fold_into(layer, fam)
    assert torch.equal(layer.weight, before)


# --- stage independence ----------------------------------------------------------------


def _code_batches(seed: int, n_batches: int = 3, batch: int = 16):
    """Fixed synthetic batches: an image and a target code per tap, shaped like the student's taps."""
    gen = torch.Generator().manual_seed(seed)
    student = TappedCNN(CFG)
    batches = []
    for _ in range(n_batches):
        image = torch.randn(batch, 1, 28, 28, generator=gen)
        codes, h = {}, image
        with torch.no_grad():  # targets: a random (fixed) net's taps, plus noise
            for n in student.unit_names:
                h = student.forward_unit(n, h)
                codes[n] = h + 0.1 * torch.randn(h.shape, generator=gen)
        batches.append({"image": image, "codes": codes})

    def epoch_batches(epoch: int):
        order = torch.randperm(n_batches, generator=torch.Generator().manual_seed(epoch)).tolist()
        for i in order:
            yield batches[i]

    target_var = {n: float(torch.cat([b["codes"][n] for b in batches]).transpose(0, 1).flatten(1).var(1).mean())
                  for n in student.unit_names}
    return epoch_batches, target_var


@pytest.mark.parametrize("closed_form_first", [True, False])
def test_a_subset_of_stages_fits_exactly_as_within_all_stages(closed_form_first):
    epoch_batches, target_var = _code_batches(0)
    torch.manual_seed(1)
    base = build_stages(TappedCNN(CFG))
    specs = stage_specs(TappedCNN(CFG))
    kw = dict(epochs=2, steps_per_epoch=3, lr=5e-3, closed_form_first=closed_form_first, log=lambda _m: None)

    all_nets = copy.deepcopy(base)
    all_curves = fit_stages(specs, all_nets, target_var, epoch_batches, **kw)
    subsets = [[specs[0]], [specs[2], specs[4]], [specs[3]], [specs[0], specs[3]]]
    for subset in subsets:
        nets = copy.deepcopy(base)
        curves = fit_stages(subset, nets, target_var, epoch_batches, **kw)
        for spec in subset:
            for (k, v), (k2, v2) in zip(nets[spec.name].state_dict().items(), all_nets[spec.name].state_dict().items()):
                assert k == k2 and torch.equal(v, v2), (spec.name, k)
            if spec.name in curves:
                assert curves[spec.name] == all_curves[spec.name]
        for name in set(base) - {s.name for s in subset}:  # stages not fitted are untouched
            for k, v in nets[name].state_dict().items():
                assert torch.equal(v, base[name].state_dict()[k]), (name, k)
    # Every fitted stage moved, and the SGD stages' losses went down.
    for name in base:
        assert not torch.equal(all_nets[name].layer.weight, base[name].layer.weight), name
    sgd_stages = [s.name for s in specs[1:]] + ([] if closed_form_first else ["conv1"])
    assert sorted(all_curves) == sorted(sgd_stages)
    for name in sgd_stages:
        assert len(all_curves[name]) == 2 and all_curves[name][1] < all_curves[name][0], name


# --- closed-form stage 1 ---------------------------------------------------------------


def _teacher(name: str, widths: list[int], std: float, seed: int) -> Teacher:
    torch.manual_seed(seed)
    cfg = CNNConfig(conv_widths=widths, fc_widths=[16], num_classes=3)
    net = TappedCNN(cfg)
    entry = TeacherEntry(
        name=name, arch="tapped_cnn", arch_args=cfg.model_dump(), weights=f"{name}.safetensors", sha256="0" * 64,
        classes=[f"{name}/{i}" for i in range(3)], input=InputSpec(shape=[1, 28, 28], mean=[0.0], std=[std]),
        taps=[TapSpec(**t.as_dict()) for t in net.feature_info()],
    )
    return Teacher(entry, net)


def test_least_squares_stage_one_reproduces_the_encoded_teachers_exactly(data_root):
    from amalgam.data.datasets import load_split, to_float

    teachers = [_teacher("a", [6, 8], 0.3, 0), _teacher("b", [5, 8], 0.5, 1)]
    images = to_float(load_split("mnist", "train", data_root).images[:192])
    student_std = 0.4  # student's own normalisation, mean 0 like the teachers: zero padding agrees
    batches = []
    stats = TapStats([6, 5], "conv")
    feats_all = []
    for i in range(0, len(images), 64):
        x = images[i : i + 64]
        _, feats = capture_teachers(teachers, x)
        stats.update([f["conv1"] for f in feats])
        feats_all.append((x, feats))
    codec = fit_pca(stats, balance=True).codec(4)
    for x, feats in feats_all:
        code = codec.encode(torch.cat([f["conv1"] for f in feats], 1))
        batches.append({"image": x / student_std, "codes": {"conv1": code}})
    target_var = float(codec.code_moments(stats)[1].mean())

    student = TappedCNN(CFG.with_widths([4, 6, 5, 8, 5]))
    spec = stage_specs(student)[0]
    closed = build_stages(student)
    fit_stages([spec], closed, {"conv1": target_var}, lambda e: iter(batches), epochs=1, steps_per_epoch=3,
               lr=1e-2, closed_form_first=True, log=lambda _m: None)

    # The exact answer: the encoder applied to each teacher's first conv, rescaled to the student's input.
    enc_w, enc_b = codec.enc_w.double(), codec.enc_b.double()
    w_parts, b_parts = [], []
    for t in teachers:
        conv = t.net.layers["conv1"]
        w_parts.append(conv.weight.double() * (student_std / t.entry.input.std[0]))
        b_parts.append(conv.bias.double())
    w_cat, b_cat = torch.cat(w_parts), torch.cat(b_parts)
    want_w = torch.einsum("kc,c...->k...", enc_w, w_cat)
    want_b = enc_w @ b_cat + enc_b
    got = closed["conv1"].layer
    assert got.weight.shape == want_w.shape == (4, 1, 3, 3)
    assert torch.allclose(got.weight.double(), want_w, rtol=0, atol=1e-4)
    assert torch.allclose(got.bias.double(), want_b, rtol=0, atol=1e-4)

    def loss(nets):
        with torch.no_grad():
            return sum(normalised_mse(nets["conv1"](b["image"]), b["codes"]["conv1"], target_var).item()
                       for b in batches) / len(batches)

    sgd = build_stages(student)
    curves = fit_stages([spec], sgd, {"conv1": target_var}, lambda e: iter(batches), epochs=4, steps_per_epoch=3,
                        lr=1e-2, closed_form_first=False, log=lambda _m: None)
    assert curves["conv1"][-1] < curves["conv1"][0]
    closed_loss, sgd_loss = loss(closed), loss(sgd)
    assert closed_loss < 1e-8  # exact up to float32
    assert closed_loss <= sgd_loss
    assert loss(build_stages(student)) > 0.5  # an unfitted stage is far off: the comparison is not vacuous


def test_lstsq_stats_merge_and_solve():
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(300, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    y = p @ w.T + b
    whole, parts = LstsqStats(), LstsqStats()
    whole.update(p, y)
    for i in range(0, 300, 70):
        piece = LstsqStats()
        piece.update(p[i : i + 70], y[i : i + 70])
        parts = parts + piece
    assert parts.count == whole.count == 300
    assert torch.allclose(parts.xtx, whole.xtx, rtol=0, atol=1e-9)
    assert torch.allclose(parts.xty, whole.xty, rtol=0, atol=1e-9)
    got_w, got_b = parts.solve()
    assert torch.allclose(got_w, w, atol=1e-6) and torch.allclose(got_b, b, atol=1e-6)
    # conv_patches are the rows a conv multiplies: conv(x) == patches @ W^T + b.
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5, generator=gen)
    rows = conv_patches(x, conv)
    assert rows.shape == (2 * 25, 18)
    with torch.no_grad():
        want = conv(x).permute(0, 2, 3, 1).reshape(-1, 3)
        assert torch.allclose(rows @ conv.weight.flatten(1).T + conv.bias, want, atol=1e-5)
