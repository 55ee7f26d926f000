"""The global class space: every class has one qualified name (``mnist/3``, ``fashion/Sneaker``).

A student's output order is the concatenation of its teachers' class lists, in zoo
order: ``[teacher 1 classes | teacher 2 classes | ...]``. Test labels are remapped by
name into that order, never by position, so a teacher listing its classes in any order
still lines up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amalgam.errors import AmalgamError


@dataclass(frozen=True)
class ClassSpace:
    names: tuple[str, ...]
    teachers: tuple[str, ...]
    slices: tuple[slice, ...]  # slices[i] = the output positions of teacher i's classes

    @classmethod
    def from_teachers(cls, teachers: list[tuple[str, list[str]]]) -> "ClassSpace":
        """Concatenate the teachers' class lists; refuse overlaps (the paper's disjoint setting)."""
        names: list[str] = []
        owner: dict[str, str] = {}
        slices = []
        for teacher, classes in teachers:
            seen_here: set[str] = set()
            for c in classes:
                if c in seen_here:
                    raise AmalgamError(f"teacher {teacher}: class {c!r} listed twice")
                seen_here.add(c)
                if c in owner:
                    raise AmalgamError(
                        f"teachers {owner[c]} and {teacher} both predict class {c!r}; "
                        "overlapping class sets are not supported yet"
                    )
                owner[c] = teacher
            slices.append(slice(len(names), len(names) + len(classes)))
            names.extend(classes)
        return cls(tuple(names), tuple(t for t, _ in teachers), tuple(slices))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AmalgamError(f"class {name!r} is not in the class space") from None

    def teacher_of(self) -> torch.Tensor:
        """int64 [num_classes]: which teacher owns each output position."""
        out = torch.empty(len(self.names), dtype=torch.long)
        for i, s in enumerate(self.slices):
            out[s] = i
        return out

    def remap(self, local_class_names: list[str], labels: torch.Tensor) -> torch.Tensor:
        """Map dataset-local labels to output positions by name; -1 where the class is absent."""
        lut = torch.tensor([self.names.index(n) if n in self.names else -1 for n in local_class_names])
        return lut[labels]
