"""Synthetic label trees of the real shapes, shared by the benchmarks (no label-tree build needed for timing)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch


@dataclass(frozen=True)
class Tree:
    name: str
    sizes: Tuple[int, ...]  # nodes per level, the last = labels
    beams: Tuple[int, ...]  # len = levels - 1

    @property
    def levels(self) -> int:
        return len(self.sizes)

    @property
    def L(self) -> int:
        return self.sizes[-1]

    def offsets(self) -> List[torch.Tensor]:
        """Evenly split children: node c of level i owns rows [floor(c m / n), floor((c + 1) m / n)) of level i+1."""
        return [torch.div(torch.arange(n + 1, dtype=torch.int64) * m, n, rounding_mode="floor")
                for n, m in zip(self.sizes[:-1], self.sizes[1:])]

    def max_children(self) -> List[int]:
        """The largest block per level: ceil(m / n) for even splits."""
        return [-(-m // n) for n, m in zip(self.sizes[:-1], self.sizes[1:])]

    def widths(self) -> List[int]:
        """Shortlist width K per level (padded): all of level 0, then beam x max children."""
        return [self.sizes[0]] + [b * c for b, c in zip(self.beams, self.max_children())]

    def table_rows(self) -> int:
        return sum(self.sizes)


TREES = {
    # Amazon-670K's CascadeXML tree (8, 8, 10-11 children) and a 2.81M-label one (16, 16, 10-11 children)
    "670k": Tree("670k", (1024, 8192, 65536, 670091), (128, 256, 400)),
    "2.8m": Tree("2.8m", (1024, 16384, 262144, 2812281), (128, 256, 400)),
    # a smaller CPU shape: 3 levels, 16 children each
    "262k": Tree("262k", (1024, 16384, 262144), (128, 256)),
    "tiny": Tree("tiny", (16, 64, 512, 4000), (4, 8, 12)),
}
