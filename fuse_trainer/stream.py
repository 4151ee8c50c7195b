"""The run's micro-batches in order: micro-batch i as (shard group, rows), counted across epochs."""

import numpy as np

from fuse_trainer.data import FusionData


class MicroBatchStream:
    """Micro-batch i of the run as (shard group, rows), deterministic from (seed, epoch): resuming needs
    only the step number."""

    def __init__(self, data: FusionData, batch_tokens: int, seed: int):
        self.data, self.batch_tokens, self.seed = data, batch_tokens, seed
        self._epochs: dict[int, list[tuple[int, np.ndarray]]] = {}  # the last epoch used only
        self._lengths: list[int] = []  # micro-batches of epochs 0, 1, ... (they differ by a batch or so)

    def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        if e not in self._epochs:
            self._epochs = {e: self.data.plan(e, self.batch_tokens, self.seed)}
        return self._epochs[e]

    def epoch_length(self, e: int) -> int:
        while len(self._lengths) <= e:
            self._lengths.append(len(self.epoch(len(self._lengths))))
        return self._lengths[e]

    @property
    def per_epoch(self) -> int:
        """Micro-batches of the first epoch (the unit of --epochs)."""
        return self.epoch_length(0)

    def run_length(self, epochs: float) -> int:
        """Micro-batches in `epochs` epochs. Every epoch holds every record, so about as many micro-batches as the
        first, unless the data drops a domain from later epochs (domain_epochs): then the epochs are counted as
        planned, a fraction of the last one pro rata."""
        if not self.data.domain_epochs:
            return int(epochs * self.per_epoch)
        whole = int(epochs)
        return sum(self.epoch_length(e) for e in range(whole)) + int((epochs - whole) * self.epoch_length(whole))

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        """Micro-batch i counted across epochs: every epoch passes over every record once."""
        e = 0
        while i >= self.epoch_length(e):
            i -= self.epoch_length(e)
            e += 1
        return self.epoch(e)[i]

    def response_tokens(self, micro_batch: tuple[int, np.ndarray]) -> int:
        shard, rows = micro_batch
        return int(self.data.index[shard].response_tokens[rows].sum())

    def tokens(self, micro_batch: tuple[int, np.ndarray]) -> int:
        shard, rows = micro_batch
        return int(self.data.index[shard].num_tokens[rows].sum())
