"""Compact-feature terms of the joint loss (engine/features.py): golden loss value, targets through the
FAM fold (teacher-forced: exact; free-running right after assembly: as close as the stages say),
the joint stage with the term on, the job field and its refusal on the store path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from amalgam.engine.amalgamate import LinearCodec, TapStats, fit_pca
from amalgam.engine.capture import capture_teachers
from amalgam.engine.features import FeatureTerm, feature_loss, feature_targets, student_capture
from amalgam.engine.joint import train_end_to_end
from amalgam.engine.stages import assemble, build_stages, fit_stages, normalised_mse, stage_specs
from amalgam.errors import AmalgamError
from amalgam.job import Job
from amalgam.student_io import DeployedStudent
from amalgam.engine.student import build_student
from amalgam.zoo.arch import CNNConfig, TappedCNN
from amalgam.zoo.resnet import ResNetConfig
from amalgam.zoo.manifest import InputSpec, TapSpec, Teacher, TeacherEntry

STUDENT = CNNConfig(conv_widths=[4, 6], fc_widths=[8], num_classes=6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _identity_codec(k: int, kind: str) -> LinearCodec:
    return LinearCodec(torch.eye(k), torch.zeros(k), torch.eye(k), torch.zeros(k), kind)


def _affine(module: nn.Module, a: list, c: list) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(torch.tensor(a, dtype=torch.float32).view_as(module.weight))
        module.bias.copy_(torch.tensor(c, dtype=torch.float32))
    return module


# --- golden value --------------------------------------------------------------------------


def test_feature_loss_golden_value_on_a_hand_built_case():
    # Units conv1 -> fc1 -> head. conv1's code has 1 channel, fc1's has 2; FAM_fc1 (a 1x1 conv)
    # is z -> 3 z + 0.5, FAM_head (linear) is z -> A z + c with A = [[2, 0], [1, 1]], c = [1, -1].
    fams = {"conv1": None, "fc1": _affine(nn.Conv2d(1, 1, 1), [[3.0]], [0.5]),
            "head": _affine(nn.Linear(2, 2), [[2.0, 0.0], [1.0, 1.0]], [1.0, -1.0])}
    codecs = {"conv1": _identity_codec(1, "conv"), "fc1": _identity_codec(2, "fc")}
    s_conv, s_fc = TapStats([1], "conv"), TapStats([2], "fc")
    s_conv.update([torch.tensor([[[[1.0, -1.0]]]])])  # values 1, -1: variance 1 -> target variance 9 * 1
    s_fc.update([torch.tensor([[1.0, 2.0], [3.0, 0.0]])])  # cov [[1, -1], [-1, 1]] -> A cov A^T = diag(4, 0)
    targets = feature_targets(["conv1", "fc1", "head"], fams, codecs, {"conv1": s_conv, "fc1": s_fc})
    assert sorted(targets) == ["conv1", "fc1"]  # the logits are the distillation loss's, not a feature term
    assert targets["conv1"].var == pytest.approx(9.0) and targets["fc1"].var == pytest.approx(2.0)

    codes = {"conv1": torch.tensor([[[[1.0, -1.0]]]]), "fc1": torch.tensor([[1.0, 2.0], [3.0, 0.0]])}
    # Targets: conv1 [3.5, -2.5]; fc1 [[3, 2], [7, 2]].
    assert torch.allclose(targets["conv1"](codes["conv1"]), torch.tensor([[[[3.5, -2.5]]]]))
    assert torch.allclose(targets["fc1"](codes["fc1"]), torch.tensor([[3.0, 2.0], [7.0, 2.0]]))
    outputs = {"conv1": torch.tensor([[[[3.5, -0.5]]]]),  # squared errors 0, 4: mse 2 -> 2 / 9
               "fc1": torch.tensor([[3.0, 3.0], [6.0, 2.0]])}  # squared errors 0, 1, 1, 0: mse 0.5 -> 0.5 / 2
    loss = feature_loss(outputs, codes, targets)
    assert loss.item() == pytest.approx((2 / 9 + 0.25) / 2, rel=1e-6)  # 0.2361111


# --- the targets through the fold ----------------------------------------------------------


RESNET = ResNetConfig(stem="small", stem_width=6, blocks=[2, 1], stage_widths=[8, 12], num_classes=5, in_channels=1,
                      image_size=16)


@pytest.mark.parametrize("config", [STUDENT, RESNET.for_student(RESNET.widths())], ids=["cnn", "resnet"])
def test_teacher_forced_folded_units_hit_their_targets_exactly(config):
    """Folded unit l fed its predecessor's target gives FAM_{l+1}(stage l's output): exactly the
    target map applied to what stage l learnt. FAMs far from identity make the check bite; a
    ResNet checks the composite units (BatchNorm, projection shortcut) fold the same way."""
    torch.manual_seed(0)
    skeleton = build_student(config).eval()
    nets = build_stages(skeleton)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in nets.values():
            for p in net.layer.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            if net.fam is not None:
                c = net.fam.weight.shape[0]
                net.fam.weight.copy_((torch.eye(c) + 0.7 * torch.randn(c, c, generator=gen)).view_as(net.fam.weight))
                net.fam.bias.copy_(torch.randn(c, generator=gen))
            net.eval()
    folded = assemble(skeleton, nets).eval()
    names = skeleton.unit_names
    x = torch.randn(5, config.in_channels, config.image_size, config.image_size, generator=gen)
    with student_capture(skeleton, names[:-1]) as cap, torch.no_grad():  # a bare net: the taps' shapes
        _, shapes = cap.run(skeleton, x)
    codes = {t: torch.randn(f.shape, generator=gen) for t, f in shapes.items()}
    stats = {}
    for tap, code in codes.items():
        stats[tap] = TapStats([code.shape[1]], "conv" if code.dim() == 4 else "fc")
        stats[tap].update([code])
    targets = feature_targets(names, {n: net.fam for n, net in nets.items()},
                              {t: _identity_codec(c.shape[1], stats[t].kind) for t, c in codes.items()}, stats)
    assert sorted(targets) == sorted(names[:-1])
    with torch.no_grad():
        for i, name in enumerate(names):
            inp = x if i == 0 else targets[names[i - 1]](codes[names[i - 1]])
            got = folded.forward_unit(name, inp)
            stage_out = nets[name](x if i == 0 else codes[names[i - 1]])
            want = targets[name](stage_out) if name in targets else stage_out
            assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())), name
            if name in targets:  # the raw stage output (or the raw code) is not the folded layer's target
                assert (got - stage_out).abs().max() > 0.1, name


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


@pytest.fixture(scope="module")
def amalgamated(data_root):
    """Two (random) teachers on 256 real MNIST images, PCA codes, stages fitted, folded: the local
    recipe in small, built once for the tests below (loading MNIST is most of its cost)."""
    from amalgam.data.datasets import load_split, to_float

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    n = 256
    teachers = [_teacher("a", [6, 8], 0.3, 0), _teacher("b", [5, 8], 0.5, 1)]
    images_u8 = load_split("mnist", "train", data_root).images[:n]
    images = to_float(images_u8)
    taps, widths = ["conv1", "conv2", "fc1"], {"conv1": 4, "conv2": 6, "fc1": 8}
    blocks = {"conv1": [6, 5], "conv2": [8, 8], "fc1": [16, 16]}
    stats = {t: TapStats(blocks[t], "fc" if t == "fc1" else "conv") for t in taps}
    feats, logits = [], []
    for i in range(0, n, 64):
        out, f = capture_teachers(teachers, images[i : i + 64])
        for t in taps:
            stats[t].update([g[t] for g in f])
        feats.append(f)
        logits.append(torch.cat(out, 1))
    codecs = {t: fit_pca(stats[t], balance=True).codec(widths[t]) for t in taps}
    spec = InputSpec(shape=[1, 28, 28], mean=[0.0], std=[0.4])  # mean 0 like the teachers: padding agrees
    batches = []
    for i, f in enumerate(feats):
        codes = {t: codecs[t].encode(torch.cat([g[t] for g in f], 1)) for t in taps}
        codes["head"] = logits[i]
        batches.append({"image": images[i * 64 : (i + 1) * 64] / 0.4, "codes": codes})
    target_var = {t: float(codecs[t].code_moments(stats[t])[1].mean()) for t in taps}
    target_var["head"] = float(torch.cat(logits).var(0).mean())
    torch.manual_seed(0)
    skeleton = TappedCNN(STUDENT)
    nets = build_stages(skeleton)
    specs = stage_specs(skeleton)
    fit_stages(specs, nets, target_var, lambda e: iter(batches), epochs=6, steps_per_epoch=len(batches), lr=1e-2,
               log=lambda _m: None)
    with torch.no_grad():  # each stage's own (teacher-forced) loss, as the stages report it
        stage_loss = {s.name: sum(normalised_mse(nets[s.name](b["image"] if s.input_tap is None else
                                                              b["codes"][s.input_tap]),
                                                 b["codes"][s.name], target_var[s.name]).item()
                                  for b in batches) / len(batches) for s in specs}
    student = DeployedStudent(assemble(skeleton, nets), spec)
    targets = feature_targets(skeleton.unit_names, {k: v.fam for k, v in nets.items()}, codecs, stats)

    def codes_of(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        _, f = capture_teachers(teachers, images[rows])
        return {t: codecs[t].encode(torch.cat([g[t] for g in f], 1)) for t in taps}

    torch.set_num_threads(before)
    return student, targets, stage_loss, codes_of, images_u8, torch.cat(logits)


def test_folded_student_taps_are_as_close_to_their_targets_as_the_stages_say(amalgamated):
    student, targets, stage_loss, codes_of, images_u8, _ = amalgamated
    rows = torch.arange(len(images_u8))
    codes = codes_of(rows)
    capture = student_capture(student, list(targets))
    with capture, torch.no_grad():
        logits, taps = capture.run(student, images_u8.float() / 255)
        assert torch.allclose(logits, student(images_u8.float() / 255))  # the hooks change nothing
    per_tap = {t: normalised_mse(taps[t], tt(codes[t]), tt.var).item() for t, tt in targets.items()}
    # conv1 reads the image, so free-running == teacher-forced: its feature loss is stage 1's loss
    # seen through FAM_conv2. Stage 1 is least squares, exact here (random teachers' first convs
    # are linear in the image), and so is the folded conv1 against its FAM target.
    assert stage_loss["conv1"] < 1e-8 and per_tap["conv1"] < 1e-8
    # Deeper taps compound the errors of the stages before them, but stay well below the
    # mean predictor (1.0) and in proportion to the stage losses up to them.
    names = ["conv1", "conv2", "fc1"]
    for i, t in enumerate(names):
        upto = sum(stage_loss[n] for n in names[: i + 1])
        assert per_tap[t] < 0.5, (t, per_tap)
        assert per_tap[t] <= 3 * upto + 0.02, (t, per_tap[t], upto)
    # Against the raw codes (ignoring the fold) every tap is further off: the FAM target is the right one.
    raw = {t: normalised_mse(taps[t], codes[t], tt.var).item() for t, tt in targets.items()}
    assert raw["conv1"] > 1e-3 and all(raw[t] > per_tap[t] for t in names), (raw, per_tap)
    # ... and an unfitted student is nowhere near: the check is not vacuous.
    fresh = DeployedStudent(TappedCNN(STUDENT), student.spec)
    with student_capture(fresh, list(targets)) as cap, torch.no_grad():
        _, ftaps = cap.run(fresh, images_u8.float() / 255)
    assert all(normalised_mse(ftaps[t], tt(codes[t]), tt.var).item() > 0.5 for t, tt in targets.items())


def test_joint_stage_with_the_feature_term_keeps_the_taps_on_target(amalgamated):
    student, targets, _, codes_of, images_u8, logits = amalgamated
    rows = torch.arange(len(images_u8))

    def tap_loss(model) -> float:
        with student_capture(model, list(targets)) as cap, torch.no_grad():
            _, taps = cap.run(model, images_u8.float() / 255)
        return feature_loss(taps, codes_of(rows), targets).item()

    before = tap_loss(student)
    runs = {}
    for weight in (0.0, 10.0):
        model = DeployedStudent(TappedCNN(STUDENT), student.spec)
        model.load_state_dict(student.state_dict())
        lines: list[str] = []
        curve = train_end_to_end(model, images_u8, logits, "mse", 3, 5e-3, 32, seed=0, log=lines.append,
                                 freeze_batchnorm=True, features=FeatureTerm(weight, targets, codes_of))
        assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
        assert ("feature loss" in lines[-1]) == (weight > 0)
        runs[weight] = tap_loss(model)
    # Logits alone let the hidden taps drift from the codes; the feature term holds them.
    assert runs[10.0] < runs[0.0]
    assert runs[10.0] <= before * 1.5


# --- the job field ---------------------------------------------------------------------------


_MIN = {"version": 1, "name": "t", "zoo": "z.yaml", "pool": {"sources": [{"dataset": "mnist", "count": 10}]}}


def test_job_field_feature_weight():
    assert Job.model_validate(_MIN).joint.feature_weight == 0.0  # the paper: logits only
    assert Job.model_validate({**_MIN, "joint": {"feature_weight": 0.5}}).joint.feature_weight == 0.5
    for bad in (-0.1, float("nan"), "lots"):
        with pytest.raises(ValueError, match="feature_weight"):
            Job.model_validate({**_MIN, "joint": {"feature_weight": bad}})


def test_store_path_refuses_feature_weight_in_one_line():
    from amalgam.distributed.store_source import StoreSource
    from amalgam.engine.run_local import OnlineSource, check_feature_source

    job = Job.model_validate({**_MIN, "joint": {"feature_weight": 0.1}})
    store = StoreSource.__new__(StoreSource)  # the real class; its constructor would start Ray
    with pytest.raises(AmalgamError) as exc:
        check_feature_source(job, store)
    assert "\n" not in str(exc.value) and "joint.feature_weight" in str(exc.value) and "--local" in str(exc.value)
    check_feature_source(job, OnlineSource.__new__(OnlineSource))  # the local path supports it
    check_feature_source(Job.model_validate(_MIN), store)  # weight 0: nothing to refuse


# --- function matching (joint.augment, engine/augment.py) ---------------------------------------


def test_random_shift_is_a_zero_filled_translation_and_mixup_a_blend():
    from amalgam.engine.augment import mix, random_shift

    x = torch.arange(1, 2 * 25 + 1, dtype=torch.float32).view(2, 1, 5, 5)
    gen = torch.Generator().manual_seed(0)
    out = random_shift(x, 1, gen)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):  # each image is one of the 9 translations by at most one pixel
        views = [padded[i, :, dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], v) for v in views)
    assert random_shift(x, 0, gen) is x
    import numpy as np

    m = mix(x, 1.0, torch.Generator().manual_seed(0), np.random.default_rng(0))
    for i in range(2):  # a convex blend of this image and one image of the batch
        lam = [((m[i] - x[j]) / (x[i] - x[j])).flatten() if i != j else None for j in range(2)][1 - i]
        assert torch.allclose(lam, lam[0].expand_as(lam)) and 0 <= float(lam[0]) <= 1


def _fm_setup(amalgamated, augment: dict, target: str = "gated"):
    """The two fixture teachers (rebuilt: same seeds), standardised on the pool, a small gate,
    the job, the local source and the function-matching term."""
    from types import SimpleNamespace

    from amalgam.classes import ClassSpace
    from amalgam.engine.calibrate import fit_calibration
    from amalgam.engine.run_local import OnlineSource, augment_term

    _, _, _, _, images_u8, logits = amalgamated
    teachers = [_teacher("a", [6, 8], 0.3, 0), _teacher("b", [5, 8], 0.5, 1)]
    space = ClassSpace.from_teachers([(t.name, t.entry.classes) for t in teachers])
    calib = fit_calibration(logits, space.blocks, "standardize")
    torch.manual_seed(3)
    gate = DeployedStudent(TappedCNN(CNNConfig(conv_widths=[4], fc_widths=[8], num_classes=2)),
                           InputSpec(shape=[1, 28, 28], mean=[0.1], std=[0.3]))
    job = Job.model_validate({**_MIN, "joint": {"target": target, "augment": augment}})
    source = OnlineSource(job, teachers, SimpleNamespace(images=images_u8), log=lambda _m: None)
    return teachers, space, calib, gate, job, source, augment_term(job, source, calib, space, gate)


def test_function_matching_target_is_the_gated_teachers_on_the_augmented_view(amalgamated):
    from amalgam.data.datasets import to_float
    from amalgam.engine.gating import gate_and_target, gated_targets

    images_u8, logits = amalgamated[4], amalgamated[5]
    teachers, space, calib, gate, job, source, term = _fm_setup(amalgamated, {"shift": 2, "mixup": 1.0})
    x = to_float(images_u8[:64])
    view = term.view(x)
    assert view.shape == x.shape and (view - x).abs().mean() > 0.05  # a different image, not the pool's
    target, codes = term.teachers(view)
    assert codes == {} and not target.requires_grad
    with torch.no_grad():  # independently: every teacher and the gate on exactly that view
        want = gated_targets(gate.eval()(view), calib(torch.cat([t(view) for t in teachers], 1)), space)
    assert torch.allclose(target, want, atol=1e-5)
    assert source.teacher_forwards == 64 * 2
    # Deterministic given the seed; another seed gives other views.
    again = _fm_setup(amalgamated, {"shift": 2, "mixup": 1.0})[-1]
    assert torch.equal(again.view(x), view)
    other = _fm_term_with_seed(amalgamated, 5)
    assert not torch.equal(other.view(x), view)
    # No augmentation: the view is the pool image and the target the pool's gated target.
    plain = _fm_setup(amalgamated, {})[-1]
    assert torch.equal(plain.view(x), x)
    pool_target = gate_and_target(gate, images_u8[:64], calib(logits[:64]), space)
    assert torch.allclose(plain.teachers(x)[0], pool_target, atol=1e-4)


def _fm_term_with_seed(amalgamated, seed: int):
    from amalgam.engine.augment import AugmentTerm

    term = _fm_setup(amalgamated, {"shift": 2, "mixup": 1.0})[-1]
    return AugmentTerm(term.shift, term.mixup, term.teachers, seed)


def test_joint_stage_with_function_matching_trains_deterministically(amalgamated):
    student, _, _, _, images_u8, logits = amalgamated
    results = []
    for _ in range(2):
        term = _fm_setup(amalgamated, {"shift": 2, "mixup": 0.4}, target="calibrated")[-1]
        model = DeployedStudent(TappedCNN(STUDENT), student.spec)
        model.load_state_dict(student.state_dict())
        # ``targets`` is unused with augment: a NaN table proves it is never read.
        curve = train_end_to_end(model, images_u8, torch.full_like(logits, float("nan")), "kd", 4, 5e-3, 32,
                                 temperature=2.0, seed=0, log=lambda _m: None, freeze_batchnorm=True, augment=term)
        assert len(curve) == 4 and all(math.isfinite(v) for v in curve)
        assert curve[-1] < 0.8 * curve[0], curve  # it trains on the views
        results.append((curve, model.state_dict()))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())


def test_job_field_augment():
    assert Job.model_validate(_MIN).joint.augment is None  # off: nothing existing changes
    aug = Job.model_validate({**_MIN, "joint": {"augment": {"shift": 2, "mixup": 0.5}}}).joint.augment
    assert (aug.shift, aug.mixup) == (2, 0.5)
    for bad in ({"shift": -1}, {"mixup": float("nan")}, {"mixup": -0.1}, {"cutmix": 1}):
        with pytest.raises(ValueError, match="augment"):
            Job.model_validate({**_MIN, "joint": {"augment": bad}})


def test_store_path_refuses_augment_in_one_line():
    from amalgam.distributed.store_source import StoreSource
    from amalgam.engine.run_local import OnlineSource, check_feature_source

    job = Job.model_validate({**_MIN, "joint": {"augment": {"shift": 2}}})
    store = StoreSource.__new__(StoreSource)  # the real class; its constructor would start Ray
    with pytest.raises(AmalgamError) as exc:
        check_feature_source(job, store)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("job t: field joint.augment:") and "--local" in msg
    check_feature_source(job, OnlineSource.__new__(OnlineSource))  # the local path supports it
