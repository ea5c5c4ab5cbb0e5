"""Which samples form which Stage II batch, and in which order: the one plan every executor follows.

The plan lists the validation batches (for K selection), the batches B_t of every possible online
epoch (a seeded, length-bucketed shuffle per epoch) and the final assignment batches. Executors
(one process, or Ray workers with any transport) walk the same plan, so results do not depend on
who ran them; the single-process run is the oracle the distributed ones must equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gs_ray.config import Config
from gs_ray.core.seeds import final_order_seed, online_order_seed
from gs_ray.data import Splits, length_bucketed_batches

VAL, ONLINE, FINAL = "val", "online", "final"
_ORDER = {VAL: 0, ONLINE: 1, FINAL: 2}

BatchKey = tuple[str, int, int]  # (phase, epoch, t)


def order_key(phase: str, epoch: int, t: int) -> tuple[int, int, int]:
    """A sortable position in the plan: batches are applied in this order."""
    return (_ORDER[phase], epoch, t)


def phase_label(phase: str, epoch: int) -> str:
    """``stage2 val``, ``stage2 online epoch 2``, ``stage2 final`` (progress lines)."""
    return f"stage2 {phase}" + (f" epoch {epoch + 1}" if phase == ONLINE else "")


@dataclass
class Stage2Plan:
    """The batches of Stage II in their global order (index arrays into the sample list)."""

    val: list[np.ndarray]
    online: list[list[np.ndarray]]  # one list of batches B_t per possible epoch
    final: list[np.ndarray]

    @classmethod
    def build(
        cls, lengths: np.ndarray, splits: Splits, cfg: Config, held_out: np.ndarray | None = None
    ) -> Stage2Plan:
        """``held_out``: training rows that take no part in the centroids (neither the K
        selection's validation subset nor the online epochs; ``Prepared.calibration_rows``): the
        final pass assigns them as it assigns the test rows, so that their clusters are what a
        new prompt's would be."""
        c, g, seed = cfg.clustering, cfg.gradients, cfg.run.seed
        kept_val, kept_train = splits.val, splits.train
        if held_out is not None and len(held_out):
            kept_val = np.setdiff1d(kept_val, held_out)
            kept_train = np.setdiff1d(kept_train, held_out)
        val = [kept_val[i : i + c.batch_size] for i in range(0, len(kept_val), c.batch_size)]
        online = [
            length_bucketed_batches(
                lengths, kept_train, c.batch_size, g.bucket_window, online_order_seed(seed, e)
            )
            for e in range(c.max_epochs)
        ]
        everything = np.sort(np.concatenate([splits.train, splits.test]))
        final = length_bucketed_batches(
            lengths, everything, c.batch_size, g.bucket_window, final_order_seed(seed)
        )
        return cls(val=val, online=online, final=final)

    def phases(self) -> list[tuple[str, int, list[np.ndarray]]]:
        """(phase, epoch, batches) in execution order (the host may stop epochs early)."""
        out = [(VAL, 0, self.val)]
        out += [(ONLINE, e, b) for e, b in enumerate(self.online)]
        out.append((FINAL, 0, self.final))
        return out

    @property
    def train(self) -> np.ndarray:
        """The samples of the online epochs (each epoch is a shuffle of the same ones), sorted."""
        if not self.online or not self.online[0]:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate(self.online[0]))

    def online_step(self, epoch: int, t: int) -> int:
        """Global index of online batch t of epoch ``epoch`` (counts across epochs)."""
        return sum(len(b) for b in self.online[:epoch]) + t
