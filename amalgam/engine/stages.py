"""Layer-wise learning: one independent stage per student layer.

Stage 1 maps the (student-normalised) image to the first tap's compact code
``F_a^1``. Stage ``l > 1`` is the part-network ``layer_l(pre_l(FAM_l(F_a^{l-1})))`` fitted to
``F_a^l``; the last stage's target is the concatenated (calibrated) teacher logits. Inputs
are the teachers' frozen compact codes, never the student's own outputs, so no stage
depends on another: each is a self-contained unit of work (:class:`StageNet` + its input
and target tap names) that a Ray Train worker can fit on its own.

Each stage's loss is the MSE divided by its target's mean per-channel variance, so one
learning rate suits every layer.

Stage 1 has a closed form: its target is an affine function of the input patches, so the
least-squares solution (:class:`LstsqStats`, mergeable like the PCA statistics) is the
exact optimum of the stage's loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amalgam.engine.fold import fold_into


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads and predicts: tap names in the code batches (``None`` = the image)."""

    name: str
    input_tap: str | None
    target_tap: str


class StageNet(nn.Module):
    """``layer(pre(FAM(x)))``; the FAM is an identity-initialised 1x1 conv or linear map."""

    def __init__(self, pre: nn.Module, layer: nn.Module, fam_channels: int | None, fam_kind: str | None):
        super().__init__()
        self.pre = copy.deepcopy(pre)
        self.layer = copy.deepcopy(layer)
        if fam_channels is None:
            self.fam = None
        else:
            fam = nn.Conv2d(fam_channels, fam_channels, 1) if fam_kind == "conv" else nn.Linear(fam_channels, fam_channels)
            with torch.no_grad():
                fam.weight.copy_(torch.eye(fam_channels).view_as(fam.weight))
                fam.bias.zero_()
            self.fam = fam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fam is not None:
            x = self.fam(x)
        return self.layer(self.pre(x))


def stage_specs(student: nn.Module) -> list[StageSpec]:
    names = student.unit_names
    return [StageSpec(n, names[i - 1] if i else None, n) for i, n in enumerate(names)]


def build_stages(student: nn.Module) -> dict[str, StageNet]:
    """One StageNet per unit, initialised from the student's (fresh) layers."""
    info = {t.name: t for t in student.feature_info()}
    out = {}
    for spec in stage_specs(student):
        prev = info[spec.input_tap] if spec.input_tap else None
        out[spec.name] = StageNet(
            student.pres[spec.name], student.layers[spec.name],
            prev.channels if prev else None, prev.kind if prev else None,
        )
    return out


def match_output_statistics(nets: dict[str, StageNet], moments: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Data-dependent init: a unit ending in BatchNorm starts at its target's per-channel mean and variance.

    A BN-terminated unit (ResNet stem or stage) outputs unit variance at init, while PCA
    codes have per-channel variances spanning orders of magnitude; Adam moves a BN scale
    by about ``lr`` per step, so without this the stage spends its budget on scale alone
    (measured: stem loss 1.16 after 3 epochs, i.e. no better than predicting the mean).
    Plain conv/linear units (the tapped CNN) are left as they are.
    """
    for name, net in nets.items():
        if name in moments and hasattr(net.layer, "init_output_statistics"):
            mean, var = moments[name]
            net.layer.init_output_statistics(mean.float(), var.double().clamp_min(1e-12).sqrt().float())


def normalised_mse(pred: torch.Tensor, target: torch.Tensor, target_var: float) -> torch.Tensor:
    """MSE over all elements divided by the target's mean per-channel variance."""
    return F.mse_loss(pred, target) / max(target_var, 1e-12)


@dataclass
class LstsqStats:
    """Mergeable normal equations of an affine least-squares fit ``y ~ W p + b`` (float64)."""

    xtx: torch.Tensor | None = None
    xty: torch.Tensor | None = None
    count: int = 0

    def update(self, p: torch.Tensor, y: torch.Tensor) -> None:
        p1 = torch.cat([p.double(), torch.ones(p.shape[0], 1, dtype=torch.float64)], 1)
        yd = y.double()
        if self.xtx is None:
            self.xtx = torch.zeros(p1.shape[1], p1.shape[1], dtype=torch.float64)
            self.xty = torch.zeros(p1.shape[1], yd.shape[1], dtype=torch.float64)
        self.xtx += p1.T @ p1
        self.xty += p1.T @ yd
        self.count += p.shape[0]

    def __add__(self, other: "LstsqStats") -> "LstsqStats":
        if self.xtx is None:
            return other
        if other.xtx is None:
            return self
        return LstsqStats(self.xtx + other.xtx, self.xty + other.xty, self.count + other.count)

    def solve(self, ridge: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.xtx is not None, "no samples"
        reg = ridge * torch.trace(self.xtx) / self.xtx.shape[0]
        sol = torch.linalg.solve(self.xtx + reg * torch.eye(self.xtx.shape[0], dtype=torch.float64), self.xty)
        return sol[:-1].T, sol[-1]  # W [out, in], b [out]


def conv_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Input patches of ``conv`` as rows: [B*H_out*W_out, C_in*kh*kw]."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def stage1_update(stats: LstsqStats, stage: StageNet, x: torch.Tensor, target: torch.Tensor) -> None:
    """Accumulate stage 1's normal equations for one batch (input already pre-processed)."""
    layer = getattr(stage.layer, "affine_layer", lambda: stage.layer)()
    h = stage.pre(x)
    if isinstance(layer, nn.Conv2d):
        stats.update(conv_patches(h, layer), target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]))
    else:
        stats.update(h.flatten(1), target)


@torch.no_grad()
def stage1_apply(stats: LstsqStats, stage: StageNet) -> None:
    w, b = stats.solve()
    if hasattr(stage.layer, "load_affine"):  # conv + BN unit: BN becomes the bias, with unit statistics
        stage.layer.load_affine(w.reshape(stage.layer.affine_layer().weight.shape), b)
        return
    stage.layer.weight.copy_(w.reshape(stage.layer.weight.shape).float())
    stage.layer.bias.copy_(b.float())


@dataclass
class StageFitter:
    """SGD state of one stage: its net, optimiser and loss curve. Independent of every other stage."""

    spec: StageSpec
    net: StageNet
    target_var: float
    lr: float
    total_steps: int
    curve: list[float] = field(default_factory=list)
    _sum: float = 0.0
    _n: int = 0

    def __post_init__(self) -> None:
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=self.lr, total_steps=max(1, self.total_steps), pct_start=0.1
        )

    def step(self, inp: torch.Tensor, target: torch.Tensor) -> float:
        loss = self.backward(inp, target)
        self.apply(loss)
        return loss

    def backward(self, inp: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> float:
        """Gradients of ``scale`` x this batch's loss into the parameters' ``.grad``; the loss.

        Split from :meth:`apply` so that ranks fitting one stage data-parallel can combine
        their gradients in between: with ``scale`` = the rank's rows, the sum over ranks
        divided by all rows is exactly the gradient of the whole global batch (the loss is a
        mean over samples)."""
        self.net.train()
        loss = normalised_mse(self.net(inp), target, self.target_var)
        self.opt.zero_grad(set_to_none=True)
        (loss * scale if scale != 1.0 else loss).backward()
        return loss.item()

    def apply(self, loss: float) -> None:
        """One optimiser and schedule step with the gradients in ``.grad``; ``loss`` joins the epoch's mean."""
        self.opt.step()
        if self.sched.last_epoch + 1 < self.sched.total_steps:
            self.sched.step()
        self._sum += loss
        self._n += 1

    def end_epoch(self) -> float:
        mean = self._sum / max(1, self._n)
        self.curve.append(mean)
        self._sum, self._n = 0.0, 0
        return mean

    def state_dict(self) -> dict:
        """Everything needed to resume this stage mid-training (a checkpoint's content)."""
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "curve": list(self.curve)}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.curve = list(state["curve"])

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> float:
        self.net.eval()
        total, n = 0.0, 0
        for b in batches:
            total += normalised_mse(self.net(stage_input(b, self.spec)), b["codes"][self.spec.target_tap], self.target_var).item()
            n += 1
        return total / max(1, n)


def closed_form_stage(specs: list[StageSpec], nets: dict[str, StageNet], enabled: bool) -> StageSpec | None:
    """The image-input stage, when its layer is one affine map (least squares is then exact).

    A plain conv or linear layer qualifies, and so does a conv + BatchNorm unit (a ResNet
    stem) that can load an affine map (``affine_layer()`` / ``load_affine``): its BN then
    carries the bias with unit statistics. Anything else is fitted by SGD like the others.
    """
    for s in specs:
        layer = nets[s.name].layer
        if s.input_tap is None and enabled and (isinstance(layer, (nn.Conv2d, nn.Linear)) or hasattr(layer, "load_affine")):
            return s
    return None


def stage_input(batch: dict, spec: StageSpec) -> torch.Tensor:
    return batch["image"] if spec.input_tap is None else batch["codes"][spec.input_tap]


def fit_stages(
    specs: list[StageSpec],
    nets: dict[str, StageNet],
    target_var: dict[str, float],
    epoch_batches: Callable[[int], Iterator[dict]],
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    closed_form_first: bool = True,
    log: Callable[[str], None] = print,
    epoch_end: Callable[[str, int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Fit every stage in ``specs`` from code batches; return each stage's loss curve.

    ``epoch_batches(epoch)`` yields dicts with ``image`` (student-normalised), ``codes``
    (tap name -> compact code; the head's code is the calibrated teacher logits). All
    stages consume the same batches (one teacher pass serves all of them), but each has
    its own parameters, optimiser and loss: stages never exchange anything, so a subset
    of ``specs`` fitted anywhere gives the same result. ``epoch_end(stage, epoch, loss)``, if
    given, is called for each SGD-fitted stage as each epoch ends (a driver's live metrics).
    """
    first = closed_form_stage(specs, nets, closed_form_first)
    lstsq = LstsqStats()
    fitters = {
        s.name: StageFitter(s, nets[s.name], target_var[s.target_tap], lr, epochs * steps_per_epoch)
        for s in specs
        if s is not first
    }
    for epoch in range(epochs):
        bar = tqdm(epoch_batches(epoch), total=steps_per_epoch, desc=f"stages epoch {epoch + 1}/{epochs}", leave=False)
        for batch in bar:
            if first is not None and epoch == 0:
                stage1_update(lstsq, nets[first.name], batch["image"], batch["codes"][first.target_tap])
            for f in fitters.values():
                f.step(stage_input(batch, f.spec), batch["codes"][f.spec.target_tap])
        bar.close()
        means = {name: f.end_epoch() for name, f in fitters.items()}
        log(f"[stages] epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if epoch_end is not None:
            for name, loss in means.items():
                epoch_end(name, epoch, loss)
    curves = {name: f.curve for name, f in fitters.items()}
    if first is not None:
        stage1_apply(lstsq, nets[first.name])
    return curves


@torch.no_grad()
def assemble(student: nn.Module, nets: dict[str, StageNet]) -> nn.Module:
    """Copy each stage's layer into the student and fold its FAM into the layer before it."""
    out = copy.deepcopy(student)
    names = out.unit_names
    for n in names:
        out.layers[n].load_state_dict(nets[n].layer.state_dict())
    for i, n in enumerate(names):
        fam = nets[n].fam
        if fam is not None:
            fold_into(out.layers[names[i - 1]], fam)
    return out
