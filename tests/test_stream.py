"""fuse_trainer.stream and the data order: every record once per epoch, shuffle windows, resumable by step."""

import numpy as np

from fuse_trainer.data import discover_sources
from fuse_trainer.stream import MicroBatchStream


def test_micro_batches_pass_over_every_record_once_per_epoch():
    class Plans:  # epochs of 3, 4, 3, 4 micro-batches, as shuffled length-sorted packing can give
        def plan(self, epoch, batch_tokens, seed):
            return [(epoch, np.array([j])) for j in range(3 + epoch % 2)]

    stream = MicroBatchStream(Plans(), batch_tokens=1, seed=0)
    served = [(e, int(rows[0])) for e, rows in (stream[i] for i in range(14))]
    assert served == [(e, j) for e in range(4) for j in range(3 + e % 2)] and stream.per_epoch == 3


def test_a_shuffle_window_mixes_the_batches_of_its_shard_groups_and_reads_each_once(world, monkeypatch):
    """Window 1 is the shard-block order of runs recorded before the option; a window of W groups shuffles
    their micro-batches together, reads each group once per epoch and holds at most W in memory."""
    import fuse_trainer.data as data_module
    from fuse_trainer.data import FusionData, token_batches

    layers = discover_sources(world["cache"], "pivot")
    blocks = FusionData(layers, window=1)
    groups = len(blocks.index)
    assert groups >= 3
    rng = np.random.default_rng([0, 0])  # the order before the option, written out
    before = [(int(i), rows) for i in rng.permutation(groups) for rows in token_batches(blocks.index[i].num_tokens, 64, rng)]
    assert [(g, rows.tolist()) for g, rows in blocks.plan(0, 64, seed=0)] == [(g, rows.tolist()) for g, rows in before]

    def switches(plan):
        return sum(plan[k][0] != plan[k - 1][0] for k in range(1, len(plan)))

    def served(plan):
        return sorted((g, int(r)) for g, rows in plan for r in rows)

    mixed = FusionData(layers, window=groups).plan(0, 64, seed=0)
    assert served(mixed) == served(before)  # every record once per epoch either way
    assert switches(before) == groups - 1 and switches(mixed) > groups

    from cache_builder.reader import read_shard

    two, reads = FusionData(layers, window=2), []

    def counting_read(folder, path, *args):
        reads.append(path)
        return read_shard(folder, path, *args)

    monkeypatch.setattr(data_module, "read_shard", counting_read)
    for g, _ in two.plan(0, 64, seed=0):
        two.shard(g)
        assert len(two._loaded) <= 2
    assert len(reads) == groups * len(layers)  # each group read once per source, never again in the epoch
