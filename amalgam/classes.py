"""The global class space: every class has one qualified name (``mnist/3``, ``fashion/Sneaker``).

A student's output order is the **union** of its teachers' class lists, in first-seen order:
teacher 1's classes, then each later teacher's classes that no earlier teacher listed. For
disjoint teachers (the paper's setting) that is the concatenation ``[teacher 1 classes |
teacher 2 classes | ...]``. Test labels are remapped by name into that order, never by
position, so a teacher listing its classes in any order still lines up.

Two column spaces, never to be confused:

- the **concatenated teacher outputs** (``sum`` of the teachers' class counts wide, what the
  teachers emit and what the store keeps): teacher ``i`` is the contiguous ``blocks[i]``;
- the **union** (``len(space)`` wide, what the student emits): teacher ``i``'s classes sit at
  ``positions[i]``, which need not be contiguous once teachers share classes.

For a disjoint zoo both coincide and ``slices`` (= ``blocks``) is still the mapping.

**Overlapping classes.** A class listed by several teachers is *shared*. Every training
target, and every ensemble, is formed from the concatenated outputs by :meth:`ClassSpace.to_union`,
one function for every site, with one rule per kind of output:

- ``mean`` (logits, raw or calibrated: the head stage's target, the joint stage's ``kd`` and
  ``mse`` targets, the ensembles): a shared class's logit is the **average of the calibrated
  logits of the teachers that know it**; an unshared class keeps its one teacher's logit.
  Calibration has already put independent teachers on one scale, so averaging is meaningful,
  and averaging asks for consensus: a teacher that is overconfident on an image from outside
  its domain (the failure ``gating`` documents) is outvoted on the shared class by the
  teacher that knows the image's real class, where taking the max would let it win. Trusting
  the least ambiguous (lowest-entropy) teacher per sample was rejected for the same reason:
  out-of-domain overconfidence is low entropy, and the target would jump between teachers.
- ``logsumexp`` (log-probabilities: the gated mixture of experts): a shared class's
  probability is the **sum of the mixture's mass** on it, ``p(c|x) = sum over teachers t
  knowing c of p(t|x) p(c|x, t)``; the result is still a normalised distribution. (The gate
  learns which teacher's domain an image is from; where teachers' domains look alike, as two
  digit teachers do, it is weak and ``joint.target: calibrated`` is the better choice: see the
  README, "Teachers whose classes overlap".)

For a disjoint zoo ``to_union`` returns its input unchanged (the same tensor), so nothing in
the disjoint pipeline changes by a single bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from amalgam.errors import AmalgamError

Combine = Literal["mean", "logsumexp"]


@dataclass(frozen=True)
class ClassSpace:
    names: tuple[str, ...]  # the union, in first-seen order: the student's output order
    teachers: tuple[str, ...]
    blocks: tuple[slice, ...]  # blocks[i] = teacher i's columns in the concatenated teacher outputs
    positions: tuple[tuple[int, ...], ...]  # positions[i] = the output positions of teacher i's classes, in its order

    @classmethod
    def from_teachers(cls, teachers: list[tuple[str, list[str]]]) -> "ClassSpace":
        """The union of the teachers' class lists in first-seen order; a class listed twice by one
        teacher is refused, a class listed by several teachers is shared (see the module doc)."""
        names: list[str] = []
        where: dict[str, int] = {}
        blocks, positions = [], []
        width = 0
        for teacher, classes in teachers:
            seen_here: set[str] = set()
            for c in classes:
                if c in seen_here:
                    raise AmalgamError(f"teacher {teacher}: class {c!r} listed twice")
                seen_here.add(c)
                if c not in where:
                    where[c] = len(names)
                    names.append(c)
            blocks.append(slice(width, width + len(classes)))
            positions.append(tuple(where[c] for c in classes))
            width += len(classes)
        return cls(tuple(names), tuple(t for t, _ in teachers), tuple(blocks), tuple(positions))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def width(self) -> int:
        """Columns of the concatenated teacher outputs (the sum of the teachers' class counts)."""
        return self.blocks[-1].stop if self.blocks else 0

    @property
    def shared(self) -> tuple[str, ...]:
        """Classes known by more than one teacher, in output order (empty for a disjoint zoo)."""
        counts = self.known().sum(0)
        return tuple(n for n, k in zip(self.names, counts.tolist()) if k > 1)

    @property
    def overlapping(self) -> bool:
        return self.width != len(self.names)

    @property
    def slices(self) -> tuple[slice, ...]:
        """Teacher i's output positions as a slice: only for a disjoint zoo, where they are ``blocks``."""
        if self.overlapping:
            raise AmalgamError(
                f"teachers share classes ({', '.join(self.shared)}): a teacher's outputs are not a slice; "
                "use ClassSpace.positions (output positions) or ClassSpace.blocks (concatenated teacher outputs)"
            )
        return self.blocks

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AmalgamError(f"class {name!r} is not in the class space") from None

    def known(self) -> torch.Tensor:
        """bool [num_teachers, num_classes]: which teachers know each output class."""
        out = torch.zeros(len(self.teachers), len(self.names), dtype=torch.bool)
        for i, pos in enumerate(self.positions):
            out[i, list(pos)] = True
        return out

    def teacher_of(self) -> torch.Tensor:
        """int64 [num_classes]: which teacher owns each output position (disjoint zoos only;
        with shared classes use :meth:`known`)."""
        out = torch.empty(len(self.names), dtype=torch.long)
        for i, s in enumerate(self.slices):
            out[s] = i
        return out

    def column_class(self) -> torch.Tensor:
        """int64 [width]: the output position of each column of the concatenated teacher outputs."""
        return torch.tensor([p for pos in self.positions for p in pos], dtype=torch.long)

    def to_union(self, concat: torch.Tensor, how: Combine = "mean") -> torch.Tensor:
        """Teachers' concatenated outputs ``[N, width]`` -> the student's class space ``[N, len(self)]``.

        ``how="mean"`` for logits (a shared class: the average of the teachers that know it),
        ``how="logsumexp"`` for log-probabilities of a mixture (a shared class: the log of the
        summed probability). The rule and its reasons are in the module docstring. A disjoint
        zoo's outputs are returned as they are (the same tensor)."""
        if how not in ("mean", "logsumexp"):
            raise ValueError(f"unknown combination {how!r}; use mean or logsumexp")
        if concat.dim() != 2 or concat.shape[1] != self.width:
            raise AmalgamError(
                f"teacher outputs have shape {tuple(concat.shape)}, expected [N, {self.width}] "
                f"(the teachers' {self.width} classes concatenated in zoo order)"
            )
        if not self.overlapping:
            return concat
        cols = self.column_class().to(concat.device)
        if how == "mean":
            total = concat.new_zeros(concat.shape[0], len(self)).index_add_(1, cols, concat)
            count = torch.bincount(cols, minlength=len(self)).to(concat.dtype)
            return total / count
        # logsumexp over each class's columns: gather them into [N, C, k], padding with -inf
        members = [[] for _ in self.names]
        for j, c in enumerate(cols.tolist()):
            members[c].append(j)
        k = max(len(m) for m in members)
        pad = self.width  # index of an extra all -inf column
        index = torch.tensor([m + [pad] * (k - len(m)) for m in members], dtype=torch.long, device=concat.device)
        padded = torch.cat([concat, concat.new_full((concat.shape[0], 1), float("-inf"))], 1)
        return padded[:, index].logsumexp(-1)

    def remap(self, local_class_names: list[str], labels: torch.Tensor) -> torch.Tensor:
        """Map dataset-local labels to output positions by name; -1 where the class is absent."""
        lut = torch.tensor([self.names.index(n) if n in self.names else -1 for n in local_class_names] + [-1],
                           dtype=torch.long)
        return lut[torch.where(labels < 0, len(local_class_names), labels)]  # -1 (unlabelled) stays -1
