import torch

from amalgam.classes import ClassSpace
from amalgam.engine.gating import fit_gate, gated_targets, teacher_margins
from amalgam.zoo.manifest import InputSpec


def test_margins_pick_the_teacher_with_the_best_logit():
    slices = (slice(0, 2), slice(2, 5))
    z = torch.tensor([[3.0, 0.0, 1.0, 2.0, 0.5], [0.0, 0.1, 0.0, 4.0, 1.0]])
    winner, margin = teacher_margins(z, slices)
    assert winner.tolist() == [0, 1]
    assert torch.allclose(margin, torch.tensor([1.0, 3.9]))


def test_gated_targets_are_a_normalised_mixture():
    slices = ClassSpace.from_teachers([("a", ["x/0", "x/1"]), ("b", ["x/2", "x/3", "x/4"])]).slices
    gate = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    cal = torch.randn(2, 5)
    logp = gated_targets(gate, cal, slices)
    assert torch.allclose(logp.logsumexp(1), torch.zeros(2), atol=1e-6)
    # Each teacher's slice carries exactly the gate's probability mass.
    p = logp.exp()
    g = gate.softmax(1)
    assert torch.allclose(p[:, :2].sum(1), g[:, 0], atol=1e-6)
    # Within a slice the teacher's own ranking is kept.
    assert torch.equal(p[:, 2:].argmax(1), cal[:, 2:].argmax(1))


def test_gate_learns_domains_from_pseudo_labels_only():
    torch.manual_seed(0)
    # Two "domains": bright images vs dark images; the pseudo-labels come from logits that
    # are right 80 % of the time. The gate must beat its own teacher on held-out data.
    n = 1200
    domain = torch.randint(0, 2, (n,))
    images = torch.where(domain[:, None, None, None] == 1, 200, 40).to(torch.uint8).expand(n, 1, 12, 12).clone()
    images += torch.randint(0, 40, images.shape, dtype=torch.uint8)
    noisy = torch.where(torch.rand(n) < 0.8, domain, 1 - domain)
    logits = torch.zeros(n, 4)
    logits[torch.arange(n), noisy * 2] = 3.0
    slices = (slice(0, 2), slice(2, 4))
    spec = InputSpec(shape=[1, 12, 12], mean=[0.5], std=[0.3])
    gate = fit_gate(images, logits, slices, spec, epochs=3, keep=1.0, log=lambda _m: None)
    with torch.no_grad():
        acc = (gate(images.float() / 255).argmax(1) == domain).float().mean().item()
    assert acc > 0.95  # the pseudo-labels were 0.8 accurate
