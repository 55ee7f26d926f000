"""Feature amalgamation: compress the teachers' concatenated tap features to a compact code.

At each tap the teachers' pre-activation features are concatenated along channels and a
linear auto-encoder (a 1x1 conv for conv taps, a linear layer for FC taps) maps them to a
compact feature ``F_a``. Two ways to fit it, one interface (:class:`LinearCodec`):

``pca`` (closed form)
    A linear AE with L2 loss is optimal at the principal subspace of the centred data.
    :class:`TapStats` accumulates the sufficient statistics (count, channel sums, Gram
    matrix; spatial positions are samples) in float64. They are sums, so partial
    statistics from any split of the data add up to the statistics of the whole: Ray
    workers reduce them exactly. A large float32 batch's Gram product runs in float32
    about the batch's mean (about twice as fast; covariance within ~2e-7 of float64, see
    :meth:`TapStats.update`) and is accumulated in float64. One eigendecomposition per
    tap and balancing setting (kept on the statistics, :func:`fit_pca`) gives every
    width as a prefix of the same basis.

``sgd`` (paper-faithful)
    The auto-encoder trained by MSE reconstruction with Adam (:func:`train_sgd_codec`).

Balancing scales each teacher's block by ``1 / sqrt(total variance of that block)`` before
the fit, so a teacher with loud features cannot take the whole compact space; the scale
is folded into the codec, which still reads and reconstructs raw features.

With more than two teachers, ``dfa`` fits one AE over all teachers and ``ifa`` amalgamates
incrementally (previous compact code + next teacher). IFA's statistics are an affine
image of the DFA statistics, so it also needs no extra pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from amalgam.engine import counters
from amalgam.errors import AmalgamError

TapKind = Literal["conv", "fc"]


def as_samples(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B*H*W, C] (spatial positions are samples); [B, C] unchanged."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() == 2:
        return x
    raise ValueError(f"expected a [B, C, H, W] or [B, C] feature, got shape {tuple(x.shape)}")


# A batch whose Gram product (rows x channels^2 multiply-adds) is at least this large, in
# float32, multiplies in float32; smaller ones (and float64 features) in float64, exactly
# as before: below it the product costs under ~10 ms either way.
FLOAT32_GRAM_MIN_WORK = 1 << 26
# Rows per float32 product, each accumulated into the float64 sums: bounds how many
# float32 terms any one partial sum holds, whatever the batch size and image size.
FLOAT32_GRAM_CHUNK = 1 << 16


def _channels_first(per_teacher: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-teacher [B, C_i, H, W] (or [B, C_i]) features -> a new [sum C_i, B*H*W] tensor.

    One copy, straight into the channels-first layout (runs of H*W contiguous values) and
    ``dtype``: the channels-last samples of :func:`as_samples` gather single elements, which
    cost as much as the float32 Gram product itself at 28x28. Always a fresh tensor, so
    the caller may centre it in place.
    """
    first = per_teacher[0]
    if first.dim() not in (2, 4):
        raise ValueError(f"expected [B, C, H, W] or [B, C] features, got shape {tuple(first.shape)}")
    c = sum(f.shape[1] for f in per_teacher)
    out = torch.empty(c, first.shape[0], *first.shape[2:], dtype=dtype, device=first.device)
    start = 0
    for f in per_teacher:
        out[start : start + f.shape[1]].copy_(f.transpose(0, 1))
        start += f.shape[1]
    return out.reshape(c, -1)


@dataclass
class TapStats:
    """Mergeable sufficient statistics of one tap's concatenated channels (float64 sums)."""

    blocks: list[int]  # channels per teacher, in zoo order
    kind: TapKind
    count: int = 0
    sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    gram: torch.Tensor = field(default=None)  # type: ignore[assignment]
    # fit_pca's eigenbases of these statistics, by balancing; emptied by update(). Widths,
    # energy widths and codecs of one tap all read one basis: an eigendecomposition of a
    # 2560-channel tap costs seconds, and a run used to repeat it two or three times.
    _bases: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = sum(self.blocks)
        if self.sum is None:
            self.sum = torch.zeros(c, dtype=torch.float64)
        if self.gram is None:
            self.gram = torch.zeros(c, c, dtype=torch.float64)

    @property
    def channels(self) -> int:
        return sum(self.blocks)

    def update(self, per_teacher: list[torch.Tensor]) -> None:
        """Add one batch: a list of per-teacher features of this tap, same batch and positions.

        The sums are float64. Float64 features, and float32 batches whose product is small,
        multiply in float64 (exact up to float64 rounding). A large float32 batch multiplies
        in float32, about the batch's own per-channel mean ``m`` (so the products are of
        centred values and nothing cancels), in chunks of ``FLOAT32_GRAM_CHUNK`` rows each
        added in float64, and is shifted back exactly in float64:
        ``sum x x^T = sum y y^T + m (sum y)^T + (sum y) m^T + n m m^T`` with ``y = x - m``.
        The shift is per batch, so the statistics stay plain sums: partials merge exactly as
        before. The covariance stays within a relative Frobenius error of ~2e-7 of the
        float64 one (tests/test_amalgamate.py bounds it at 1e-5), and the statistics of the
        demo zoo's 4x-wide conv taps (256 images a batch) cost 0.38-0.47x the CPU time of
        the former float64, channels-last update.
        """
        self._bases.clear()
        c = sum(f.shape[1] for f in per_teacher)
        if c != self.channels:
            raise ValueError(f"batch has {c} channels, statistics expect {self.channels}")
        n = per_teacher[0].numel() // per_teacher[0].shape[1]
        self.count += n
        # Float32 pays where the product dominates: many rows per channel (conv taps). An FC
        # tap's batch has fewer rows than channels, and the float64 matrix work of the shift
        # back would cost more than the product it saves.
        wide = (any(f.dtype == torch.float64 for f in per_teacher) or n * c * c < FLOAT32_GRAM_MIN_WORK
                or n < 8 * c)
        x = _channels_first(per_teacher, torch.float64 if wide else torch.float32)
        if wide:
            self.sum += x.sum(1).cpu()
            self.gram += (x @ x.T).cpu()
            return
        m = x.mean(1, keepdim=True)
        x -= m  # a fresh copy: centred in place
        g = torch.zeros(c, c, dtype=torch.float64, device=x.device)
        for i in range(0, n, FLOAT32_GRAM_CHUNK):
            z = x[:, i : i + FLOAT32_GRAM_CHUNK]
            g += z @ z.T  # float32 product, added in float64
        ys = x.sum(1).double()  # centred values: their float32 sum is tiny, and exact enough
        m = m[:, 0].double()
        g.addr_(m, ys).addr_(ys, m).addr_(m, m, alpha=n)
        self.sum += (ys + n * m).cpu()
        self.gram += g.cpu()

    def __add__(self, other: "TapStats") -> "TapStats":
        if other.blocks != self.blocks or other.kind != self.kind:
            raise ValueError("cannot merge statistics of different taps")
        return TapStats(self.blocks, self.kind, self.count + other.count, self.sum + other.sum, self.gram + other.gram)

    def mean(self) -> torch.Tensor:
        self._check_nonempty()
        return self.sum / self.count

    def cov(self) -> torch.Tensor:
        """Population covariance of the channels."""
        mu = self.mean()
        c = self.gram / self.count - torch.outer(mu, mu)
        return (c + c.T) / 2

    def block_slices(self) -> list[slice]:
        out, start = [], 0
        for b in self.blocks:
            out.append(slice(start, start + b))
            start += b
        return out

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise AmalgamError("no samples were accumulated for this tap")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "blocks": torch.tensor(self.blocks),
            "kind": torch.tensor(0 if self.kind == "conv" else 1),
            "count": torch.tensor(self.count, dtype=torch.int64),
            "sum": self.sum,
            "gram": self.gram,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "TapStats":
        return cls(
            [int(b) for b in d["blocks"]], "conv" if int(d["kind"]) == 0 else "fc", int(d["count"]),
            d["sum"].to(torch.float64), d["gram"].to(torch.float64),
        )


class LinearCodec(nn.Module):
    """A frozen linear auto-encoder on one tap: ``code = E x + e``, ``x_hat = D code + d``.

    Applied per position (a 1x1 conv) for conv taps and per sample for FC taps.
    """

    def __init__(self, enc_w: torch.Tensor, enc_b: torch.Tensor, dec_w: torch.Tensor, dec_b: torch.Tensor, kind: TapKind):
        super().__init__()
        self.kind = kind
        self.register_buffer("enc_w", enc_w.float().contiguous())
        self.register_buffer("enc_b", enc_b.float().contiguous())
        self.register_buffer("dec_w", dec_w.float().contiguous())
        self.register_buffer("dec_b", dec_b.float().contiguous())
        self.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.enc_w.shape[0]

    @property
    def in_channels(self) -> int:
        return self.enc_w.shape[1]

    def _apply_affine(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv2d(x, w[:, :, None, None], b)
        return F.linear(x, w, b)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_affine(x, self.enc_w, self.enc_b)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._apply_affine(z, self.dec_w, self.dec_b)

    def prefix(self, k: int) -> "LinearCodec":
        """The first ``k`` code channels (exact for PCA codecs, whose channels are sorted by variance)."""
        return LinearCodec(self.enc_w[:k], self.enc_b[:k], self.dec_w[:, :k], self.dec_b, self.kind)

    def code_moments(self, stats: TapStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and per-channel variance of the code over the data the statistics describe."""
        e = self.enc_w.double()
        mean = e @ stats.mean() + self.enc_b.double()
        var = torch.einsum("kc,cd,kd->k", e, stats.cov(), e)
        return mean, var

    def residual(self, stats: TapStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact expected squared reconstruction error per channel, and the raw variance per channel.

        residual r = (I - D E) x - D e - d, so E|r|^2 = diag(M Cov M^T) + (M mu - D e - d)^2.
        """
        e, d = self.enc_w.double(), self.dec_w.double()
        m = torch.eye(stats.channels, dtype=torch.float64) - d @ e
        cov, mu = stats.cov(), stats.mean()
        bias = m @ mu - d @ self.enc_b.double() - self.dec_b.double()
        err = torch.einsum("ic,cd,id->i", m, cov, m) + bias**2
        return err, torch.diagonal(cov)

    def kept_variance(self, stats: TapStats) -> dict[str, float]:
        """Fraction of variance kept, in total and per teacher block (``teacher_i`` keys by index)."""
        err, var = self.residual(stats)
        out = {"total": float(1 - err.sum() / var.sum())}
        for i, s in enumerate(stats.block_slices()):
            out[f"teacher_{i}"] = float(1 - err[s].sum() / var[s].sum().clamp_min(1e-30))
        return out


def balance_scale(stats: TapStats, balance: bool) -> torch.Tensor:
    """Per-channel scale: ``1 / sqrt(total variance of the channel's teacher block)``, or ones."""
    scale = torch.ones(stats.channels, dtype=torch.float64)
    if balance:
        var = torch.diagonal(stats.cov())
        for s in stats.block_slices():
            scale[s] = 1.0 / var[s].sum().clamp_min(1e-12).sqrt()
    return scale


@dataclass
class PCABasis:
    """Eigenbasis of one tap's (optionally balanced) covariance; every width is a prefix."""

    mean: torch.Tensor  # [C] float64
    scale: torch.Tensor  # [C] float64, balancing
    eigvals: torch.Tensor  # [C] descending, in the balanced space
    eigvecs: torch.Tensor  # [C, C], column i = i-th principal direction in the balanced space
    kind: TapKind

    def codec(self, k: int) -> LinearCodec:
        """Encoder ``U_k^T S (x - mu)``; decoder ``S^-1 U_k z + mu``."""
        if not 1 <= k <= len(self.eigvals):
            raise AmalgamError(f"compact width {k} out of range 1..{len(self.eigvals)}")
        u = self.eigvecs[:, :k]
        enc_w = u.T * self.scale[None, :]
        enc_b = -enc_w @ self.mean
        dec_w = u / self.scale[:, None]
        return LinearCodec(enc_w, enc_b, dec_w, self.mean.clone(), self.kind)

    def energy_width(self, energy: float) -> int:
        """Smallest width keeping ``energy`` of the (balanced) variance."""
        frac = torch.cumsum(self.eigvals.clamp_min(0), 0) / self.eigvals.clamp_min(0).sum()
        k = int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype)).item()) + 1
        return min(k, len(self.eigvals))  # rounding can leave the last cumulative fraction just below 1


def fit_pca(stats: TapStats, balance: bool = False) -> PCABasis:
    """The eigenbasis of ``stats`` (balanced or not): computed once per statistics object and
    kept on it (``TapStats._bases``, emptied when a batch is added), so the widths, the
    energy widths and the codec of one tap share one eigendecomposition."""
    key = bool(balance)
    if key not in stats._bases:
        stats._bases[key] = _fit_pca(stats, key)
    return stats._bases[key]


def _fit_pca(stats: TapStats, balance: bool) -> PCABasis:
    counters.add(counters.AUTOENCODER_FITS)
    scale = balance_scale(stats, balance)
    cov = stats.cov() * scale[:, None] * scale[None, :]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = torch.argsort(eigvals, descending=True)
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    # Fix each direction's sign (largest |component| positive) so bases are reproducible.
    idx = eigvecs.abs().argmax(0)
    signs = torch.sign(eigvecs[idx, torch.arange(eigvecs.shape[1])])
    signs[signs == 0] = 1
    return PCABasis(stats.mean().clone(), scale, eigvals, eigvecs * signs, stats.kind)


def affine_stats(stats: TapStats, a: torch.Tensor, b: torch.Tensor, blocks: list[int]) -> TapStats:
    """Statistics of ``y = A x + b`` from those of ``x`` (exact: first and second moments transform).

    The Gram of a linear map of a code is one such: no pass over the data is needed for it."""
    n = stats.count
    mu = a @ stats.mean() + b
    cov = a @ stats.cov() @ a.T
    gram = (cov + torch.outer(mu, mu)) * n
    return TapStats(blocks, stats.kind, n, mu * n, gram)


def fit_ifa(stats: TapStats, k: int, balance: bool = False) -> LinearCodec:
    """Incremental amalgamation: code_t = AE([code_{t-1} | teacher t]), all from the DFA statistics.

    Returns one codec on the full concatenation (the composition of the steps), so it is a
    drop-in for a DFA codec.
    """
    slices = stats.block_slices()
    c = stats.channels
    # enc: x -> code (k_prev x C); the first "code" is teacher 1's raw features.
    first = slices[0]
    enc_w = torch.zeros(first.stop - first.start, c, dtype=torch.float64)
    enc_w[:, first] = torch.eye(first.stop - first.start, dtype=torch.float64)
    enc_b = torch.zeros(enc_w.shape[0], dtype=torch.float64)
    # dec: code -> x_hat of the teachers seen so far (as rows of the full concatenation).
    dec_w = enc_w.T.clone()
    dec_b = torch.zeros(c, dtype=torch.float64)
    for s in slices[1:]:
        width_t = s.stop - s.start
        # Input of this step: [code_prev ; x_t] = A x + a.
        a = torch.cat([enc_w, torch.eye(c, dtype=torch.float64)[s]], 0)
        a_b = torch.cat([enc_b, torch.zeros(width_t, dtype=torch.float64)])
        step_stats = affine_stats(stats, a, a_b, [enc_w.shape[0], width_t])
        kk = min(k, step_stats.channels)
        step = fit_pca(step_stats, balance).codec(kk)
        se_w, se_b = step.enc_w.double(), step.enc_b.double()
        sd_w, sd_b = step.dec_w.double(), step.dec_b.double()
        # Compose the encoder.
        new_enc_w, new_enc_b = se_w @ a, se_w @ a_b + se_b
        # Compose the decoder: step decodes [code_prev ; x_t]; code_prev decodes through dec_prev.
        kp = enc_w.shape[0]
        new_dec_w = dec_w @ sd_w[:kp] + torch.eye(c, dtype=torch.float64)[:, s] @ sd_w[kp:]
        new_dec_b = dec_w @ sd_b[:kp] + dec_b + torch.eye(c, dtype=torch.float64)[:, s] @ sd_b[kp:]
        enc_w, enc_b, dec_w, dec_b = new_enc_w, new_enc_b, new_dec_w, new_dec_b
    if enc_w.shape[0] > k:  # a single teacher: plain PCA of its block
        return fit_pca(stats, balance).codec(k)
    return LinearCodec(enc_w, enc_b, dec_w, dec_b, stats.kind)


# ------------------------------------------------------------ steps on a stored code (amalgam retrain)
#
# A PCA codec's decoder reconstructs every teacher it was fitted on from the compact code
# alone: x_hat = D c + m, and teacher i's rows give x_hat_i = D_i c + m_i (up to the PCA
# residual). So when teachers leave or change, the kept teachers' features are an affine
# function of the stored code, and an auto-encoder over them (plus new teachers' features)
# needs no forward of an old teacher: its statistics are an affine image of the statistics
# of ``[code | new features]``, and so is its encoder.


def block_rows(blocks: list[int], keep: list[int]) -> torch.Tensor:
    """Channel indices of the blocks ``keep`` (indices into ``blocks``), in the order given."""
    starts = [0]
    for b in blocks:
        starts.append(starts[-1] + b)
    parts = [torch.arange(starts[i], starts[i + 1]) for i in keep]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def restrict_decoder(codec: LinearCodec, blocks: list[int], keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``code -> features of teachers keep`` inside ``codec``'s decoder (float64).

    ``blocks`` are the channels of each teacher of the concatenation ``codec`` decodes to. The
    kept teachers' reconstruction is exactly the full reconstruction's rows: removing a teacher
    costs nothing but its rows.
    """
    if codec.dec_w.shape[0] != sum(blocks):
        raise AmalgamError(f"the decoder reconstructs {codec.dec_w.shape[0]} channels, the teacher blocks sum to {sum(blocks)}")
    rows = block_rows(blocks, keep)
    return codec.dec_w.double()[rows], codec.dec_b.double()[rows]


def _blockdiag(*mats: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*[m.double() for m in mats])


@dataclass
class CodeStep:
    """One amalgamation step whose old teachers come from a stored compact code.

    Its pass sees ``y = [code | new teachers' features]``; the step amalgamates
    ``z = A y + a`` (``blocks`` are z's balancing blocks) and the teachers' features are
    ``G z + g`` (``teacher_blocks`` per teacher, kept old ones first, then the new ones;
    ``G`` is None when the stored code has no decoder to teacher features).
    """

    a_w: torch.Tensor
    a_b: torch.Tensor
    blocks: list[int]
    g_w: torch.Tensor | None
    g_b: torch.Tensor | None
    teacher_blocks: list[int] | None

    def stats(self, y_stats: TapStats) -> TapStats:
        """The statistics of z, exact, from those of y (old-old, old-new and new-new Gram blocks at once)."""
        return affine_stats(y_stats, self.a_w, self.a_b, self.blocks)

    def input_codec(self, codec: LinearCodec) -> LinearCodec:
        """``codec`` (fitted on z) as a codec on y, for the pass that writes the codes: it encodes y
        exactly as ``codec`` encodes ``A y + a``; its decoder reconstructs the teachers' features
        (z itself when there is no decoder to teachers), so a later step can read this code as
        this step read the previous one."""
        e = codec.enc_w.double()
        enc_w, enc_b = e @ self.a_w, e @ self.a_b + codec.enc_b.double()
        dec_w, dec_b = codec.dec_w.double(), codec.dec_b.double()
        if self.g_w is not None:
            dec_w, dec_b = self.g_w @ dec_w, self.g_w @ dec_b + self.g_b
        return LinearCodec(enc_w, enc_b, dec_w, dec_b, codec.kind)


def code_step(y_stats: TapStats, strategy: Literal["dfa", "ifa"], balance: bool,
              decoder: LinearCodec | None = None, old_blocks: list[int] | None = None,
              keep: list[int] | None = None) -> CodeStep:
    """The step over ``y = [code | new teachers]`` (``y_stats.blocks``: code width, then each new teacher).

    ``decoder`` decodes the code to the old teachers' concatenated features (``old_blocks``
    per teacher); ``keep`` are the old teachers still in the zoo (default: all).

    * ``ifa``, no old teacher dropped: z = y, the code is one block (the plain IFA step).
    * ``ifa``, some dropped: the previous code becomes the kept teachers' reconstruction
      ``D_K c + m_K`` (each teacher scaled to unit total variance when balancing, as the
      champion's own code is balanced inside), one block, in an orthonormal basis of its span.
    * ``dfa``: z = [each kept teacher's reconstruction | each new teacher], every teacher its
      own block: one auto-encoder over all teachers, the old ones' Gram blocks (with each
      other and with the new teachers) read off the statistics of y.
    """
    w, new = y_stats.blocks[0], list(y_stats.blocks[1:])
    n_new = sum(new)
    eye = torch.eye(n_new, dtype=torch.float64)
    if decoder is None:
        if strategy == "dfa" or keep is not None:
            raise AmalgamError("without a decoder to the old teachers' features, only an IFA step that keeps them all")
        return CodeStep(torch.eye(w + n_new, dtype=torch.float64), torch.zeros(w + n_new, dtype=torch.float64),
                        list(y_stats.blocks), None, None, None)
    if decoder.dec_w.shape[1] != w:
        raise AmalgamError(f"the decoder reads a code of width {decoder.dec_w.shape[1]}, the pass's code has {w}")
    old_blocks = list(old_blocks or [])
    keep = list(range(len(old_blocks))) if keep is None else list(keep)
    kept_blocks = [old_blocks[i] for i in keep]
    d, m = restrict_decoder(decoder, old_blocks, keep)
    if strategy == "ifa" and len(keep) == len(old_blocks):
        a_w, a_b = torch.eye(w + n_new, dtype=torch.float64), torch.zeros(w + n_new, dtype=torch.float64)
        g_w = _blockdiag(decoder.dec_w, eye)
        g_b = torch.cat([decoder.dec_b.double(), torch.zeros(n_new, dtype=torch.float64)])
        return CodeStep(a_w, a_b, list(y_stats.blocks), g_w, g_b, old_blocks + new)
    if not kept_blocks and not new:
        raise AmalgamError("no teacher left to amalgamate")
    zeros_new = torch.zeros(n_new, dtype=torch.float64)
    if strategy == "dfa":
        a_w, a_b = _blockdiag(d, eye), torch.cat([m, zeros_new])
        g = torch.eye(a_w.shape[0], dtype=torch.float64)
        return CodeStep(a_w, a_b, kept_blocks + new, g, torch.zeros(a_w.shape[0], dtype=torch.float64),
                        kept_blocks + new)
    # IFA with teachers dropped: the kept teachers' reconstruction D_K c + m_K, each teacher scaled
    # to unit total variance when balancing. It lies in the column space of (scaled) D_K, at most
    # the code's width: expressed in an orthonormal basis Q of it (an isometry, so the centred
    # PCA is the same), the block is no wider than the code however many channels the teachers have.
    scale = torch.ones(d.shape[0], dtype=torch.float64)
    if balance:
        cov_c = y_stats.cov()[:w, :w]
        start = 0
        for b in kept_blocks:
            s = slice(start, start + b)
            scale[s] = 1.0 / torch.einsum("ic,cd,id->", d[s], cov_c, d[s]).clamp_min(1e-12).sqrt()
            start += b
    ds = d * scale[:, None]
    q = torch.linalg.qr(ds)[0] if kept_blocks else torch.zeros(0, 0, dtype=torch.float64)
    a_w = _blockdiag(q.T @ ds if kept_blocks else torch.zeros(0, w, dtype=torch.float64), eye)
    g_w = _blockdiag(q / scale[:, None], eye)
    g_b = torch.cat([m, zeros_new])
    blocks = ([q.shape[1]] if kept_blocks else []) + new
    return CodeStep(a_w, torch.zeros(a_w.shape[0], dtype=torch.float64), blocks, g_w, g_b, kept_blocks + new)


class SGDCodecTrainer:
    """The paper's auto-encoder: 1x1-conv (or linear) encoder/decoder trained by MSE reconstruction.

    Inputs are balanced (when asked) and centred with the statistics' mean and scale, like
    the PCA codec, so the two modes differ only in how the linear maps are found. Feed
    per-teacher feature batches with :meth:`step` (several taps can train side by side on
    one teacher pass), then take the frozen :meth:`codec`.
    """

    def __init__(self, stats: TapStats, k: int, balance: bool = False, lr: float = 1e-3, seed: int = 0):
        counters.add(counters.AUTOENCODER_FITS)
        gen = torch.Generator().manual_seed(seed)
        self.kind = stats.kind
        self.scale = balance_scale(stats, balance).float()
        self.mean = stats.mean().float()
        c = stats.channels
        self.enc, self.dec = nn.Linear(c, k), nn.Linear(k, c)
        with torch.no_grad():
            for lin in (self.enc, self.dec):
                bound = 1 / lin.in_features**0.5
                lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=gen))
                lin.bias.zero_()
        self.opt = torch.optim.Adam([*self.enc.parameters(), *self.dec.parameters()], lr=lr)
        self.var = float((torch.diagonal(stats.cov()).float() * self.scale**2).sum())
        self.curve: list[float] = []
        self._sum, self._n = 0.0, 0

    def step(self, per_teacher: list[torch.Tensor]) -> float:
        x = (torch.cat([as_samples(f) for f in per_teacher], 1) - self.mean) * self.scale
        loss = ((self.dec(self.enc(x)) - x) ** 2).sum(1).mean() / self.var
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._sum += loss.item()
        self._n += 1
        return loss.item()

    def end_epoch(self) -> float:
        self.curve.append(self._sum / max(1, self._n))
        self._sum, self._n = 0.0, 0
        return self.curve[-1]

    @torch.no_grad()
    def codec(self) -> LinearCodec:
        s, m = self.scale.double(), self.mean.double()
        enc_w = self.enc.weight.double() * s[None, :]
        enc_b = self.enc.bias.double() - enc_w @ m
        dec_w = self.dec.weight.double() / s[:, None]
        dec_b = self.dec.bias.double() / s + m
        return LinearCodec(enc_w, enc_b, dec_w, dec_b, self.kind)
