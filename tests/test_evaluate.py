import json
import math

import pytest
import torch
from torch import nn

from amalgam.classes import ClassSpace
from amalgam.engine.evaluate import (
    Concat,
    Metrics,
    count_macs,
    count_params,
    cpu_latency_ms,
    evaluate_logits,
    predict_logits,
)
from amalgam.errors import AmalgamError
from amalgam.zoo.arch import CNNConfig, TappedCNN

SPACE = ClassSpace.from_teachers([("A", ["a0", "a1"]), ("B", ["b0", "b1", "b2"])])

# Each row: (true label, logits over [a0 a1 | b0 b1 b2]), with the expected outcomes.
ROWS = [
    (0, [3, 1, 0, 0, 0]),  # A: in-slice right, overall right
    (1, [0, 2, 5, 0, 0]),  # A: in-slice right, loses overall to B's b0 (the case the two metrics split on)
    (0, [1, 2, 0, 0, 0]),  # A: wrong both ways (predicts a1)
    (3, [0, 0, 1, 4, 2]),  # B: right both ways
    (4, [9, 0, 0, 1, 3]),  # B: in-slice right, loses overall to A's a0
    (-1, [0, 0, 0, 0, 9]),  # not in the class space: ignored
]
LABELS = torch.tensor([r[0] for r in ROWS])
LOGITS = torch.tensor([r[1] for r in ROWS], dtype=torch.float)


def test_task_aware_and_comprehensive_differ_exactly():
    m = evaluate_logits(LOGITS, LABELS, SPACE)
    assert m.n == 5
    assert m.task_aware == pytest.approx({"A": 2 / 3, "B": 1.0})
    assert m.comprehensive_per_task == pytest.approx({"A": 1 / 3, "B": 1 / 2})
    assert m.comprehensive == pytest.approx(2 / 5)


def test_confusion_rows_true_cols_predicted():
    m = evaluate_logits(LOGITS, LABELS, SPACE)
    expected = torch.zeros(5, 5, dtype=torch.long)
    for t, p in [(0, 0), (1, 2), (0, 1), (3, 3), (4, 0)]:
        expected[t, p] += 1
    assert m.confusion.dtype == torch.int64
    assert torch.equal(m.confusion, expected)
    assert m.confusion.sum().item() == m.n
    assert m.confusion.sum(1).tolist() == [2, 1, 0, 1, 1]  # per-class sample counts
    assert m.confusion.diag().sum().item() / m.n == pytest.approx(m.comprehensive)


def test_minus_one_labels_are_ignored():
    with_outsider = evaluate_logits(LOGITS, LABELS, SPACE)
    without = evaluate_logits(LOGITS[:-1], LABELS[:-1], SPACE)
    assert with_outsider.to_dict() == without.to_dict()


def test_teacher_without_samples_is_nan_and_json_null():
    m = evaluate_logits(LOGITS[3:5], LABELS[3:5], SPACE)  # only B's samples
    assert math.isnan(m.task_aware["A"]) and math.isnan(m.comprehensive_per_task["A"])
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["task_aware"] == {"A": None, "B": 1.0}
    back = Metrics.from_dict(d)
    assert math.isnan(back.task_aware["A"]) and back.task_aware["B"] == 1.0
    assert torch.equal(back.confusion, m.confusion)


def test_to_dict_is_json_and_round_trips():
    m = evaluate_logits(LOGITS, LABELS, SPACE)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["confusion"] == m.confusion.tolist()
    assert Metrics.from_dict(d).to_dict() == m.to_dict()


def test_bad_shapes_and_labels_are_refused():
    with pytest.raises(AmalgamError, match="expected \\[N, 5\\]"):
        evaluate_logits(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), SPACE)
    with pytest.raises(AmalgamError, match="labels have shape"):
        evaluate_logits(torch.zeros(3, 5), torch.zeros(2, dtype=torch.long), SPACE)
    with pytest.raises(AmalgamError, match="labels must lie in"):
        evaluate_logits(torch.zeros(1, 5), torch.tensor([5]), SPACE)


class MeanModel(nn.Module):
    """Returns each image's mean pixel twice, so the /255 scaling is visible in the output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        m = x.mean(dim=(1, 2, 3), keepdim=False)[:, None] * self.w
        return torch.cat([m, m], dim=1)


def test_predict_logits_scales_batches_and_restores_mode():
    images = torch.tensor([0, 51, 255, 102, 204], dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 4, 4)
    model = MeanModel().train()
    out = predict_logits(model, images, batch=2)
    assert out.shape == (5, 2)
    assert out[:, 0].tolist() == pytest.approx([0.0, 0.2, 1.0, 0.4, 0.8])
    assert model.seen_training == [False, False, False]  # 3 batches, all in eval mode
    assert model.training  # caller's mode restored
    assert not out.requires_grad
    with pytest.raises(TypeError, match="uint8"):
        predict_logits(model, images.float())


def _small_net() -> nn.Module:
    # input 1x8x8 -> conv 4x8x8 -> grouped conv 8x6x6 -> pool 8x3x3 -> linear 72->10
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(72, 10),
    )


def test_macs_match_hand_computation():
    conv1 = (4 * 8 * 8) * 1 * 9  # out elems * in_ch/groups * k*k = 2304
    conv2 = (8 * 6 * 6) * (4 // 2) * 9  # 5184
    linear = 72 * 10  # 720
    net = _small_net()
    assert count_macs(net, (1, 8, 8)) == conv1 + conv2 + linear == 8208
    assert count_macs(Concat([net, _small_net()]), (1, 8, 8)) == 2 * 8208
    assert net.training  # mode untouched


def test_tapped_cnn_params_and_macs():
    net = TappedCNN(CNNConfig(conv_widths=[16, 32, 64], fc_widths=[128], num_classes=5))
    assert count_params(net) == 97797
    expected = 28 * 28 * 16 * 1 * 9 + 14 * 14 * 32 * 16 * 9 + 7 * 7 * 64 * 32 * 9 + 576 * 128 + 128 * 5
    assert count_macs(net, (1, 28, 28)) == expected


def test_concat_outputs_params_and_latency():
    torch.manual_seed(0)
    a = TappedCNN(CNNConfig(conv_widths=[4, 8], num_classes=2))
    b = TappedCNN(CNNConfig(conv_widths=[4, 8], num_classes=3))
    both = Concat([a, b]).eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        out = both(x)
        assert out.shape == (6, 5)
        assert torch.equal(out[:, :2], a(x)) and torch.equal(out[:, 2:], b(x))
    assert count_params(both) == count_params(a) + count_params(b)
    ms = cpu_latency_ms(both, (1, 28, 28), batch=4, repeats=3, warmup=1)
    assert ms > 0 and math.isfinite(ms)
    assert cpu_latency_ms(lambda t: t * 2, (1, 28, 28), batch=2, repeats=2, warmup=0) >= 0
