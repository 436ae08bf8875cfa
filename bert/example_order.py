"""The order in which pretraining reads its examples: one seeded order over the whole shards dir, the same
for any number of workers, split across ranks by micro-batch.

    GlobalStream(shards, seed)                    every example, epoch after epoch, in a seeded order
    stream.rank_batches(b, start, rank, world)    rank r's micro-batches of that order, from sample `start`

The order: epoch e visits the part files in a permutation drawn from (seed, e), and the rows of
file f in a permutation drawn from (seed, e, f). Cut into blocks of `b` consecutive samples, block
j (counted from sample 0) is one micro-batch; rank r of `world` takes the blocks with
j % world == r, in order. With a global batch of G = M x b samples (M micro-batches per step,
M divisible by every worker count the run may have), step k is blocks k*M .. k*M+M-1 whatever the
number of workers: on N workers rank r does blocks k*M + r, k*M + r + N, ... (M/N of them, gradient
accumulation filling the gap). So the sequence of global batches, their masks and their dropout (seeded
by the block, `bert.pretrain.train_step`) do not depend on N, and a run resumed on another worker count,
or resized while it runs, sees the examples an uninterrupted run would. Only the order of the
floating-point sums differs (see README, "Preemptible nodes").

The position is one number, the samples consumed (step x G), so a checkpoint needs nothing else.
Every rank reads every part file it has blocks in (all of them, for a batch spread over all ranks) and
decodes only its own rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from bert.errors import InputError


class GlobalStream:
    """All examples of a shards dir in one seeded order, resumable at any sample (see the module docstring)."""

    def __init__(self, shards: Any, seed: int):
        self.shards = shards  # bert.shards.ShardSet
        self.files, self.rows, self.seed = list(shards.files), list(shards.rows), seed
        self.epoch_size = sum(self.rows)
        if self.epoch_size == 0:
            raise InputError(f"the part files of {shards.path} hold no examples")

    def file_order(self, epoch: int) -> list[int]:
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.files))]

    def row_order(self, epoch: int, file_index: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, file_index]).permutation(self.rows[file_index])

    def positions(self, start: int) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(file index, next file index, rows in order, global sample of the first) from sample `start` on."""
        epoch, offset = divmod(start, self.epoch_size)
        sample = start
        while True:
            order = self.file_order(epoch)
            for position, file_index in enumerate(order):
                n = self.rows[file_index]
                if offset >= n:
                    offset -= n
                    continue
                upcoming = order[position + 1] if position + 1 < len(order) else self.file_order(epoch + 1)[0]
                rows = self.row_order(epoch, file_index)[offset:]
                yield file_index, upcoming, rows, sample
                sample += len(rows)
                offset = 0
            epoch += 1

    def rank_batches(self, batch_size: int, start: int, rank: int, world: int) -> Iterator[list[dict[str, Any]]]:
        """Rank `rank`'s micro-batches of `batch_size` rows: the blocks j (of `batch_size` samples from sample 0)
        with j % world == rank, from sample `start` (a multiple of batch_size x world) on."""
        if start % (batch_size * world):
            raise ValueError(f"start {start} is not a multiple of micro-batch x workers = {batch_size * world}")
        pending: list[dict[str, Any]] = []
        for file_index, upcoming, rows, first in self.positions(start):
            blocks = (first + np.arange(len(rows))) // batch_size
            mine = rows[blocks % world == rank]
            columns = self.shards.read_part(self.files[file_index]).to_pydict() if len(mine) else {}
            self.shards.prefetch(self.files[upcoming])  # read-ahead while this file's rows are consumed
            for i in mine:
                pending.append({k: v[i] for k, v in columns.items()})
                if len(pending) == batch_size:
                    yield pending
                    pending = []

    def block_ids(self, batch_size: int, start: int, count: int) -> list[list[tuple[int, int]]]:
        """The (file index, row) of each sample of `count` blocks from sample `start`: what step k holds."""
        out: list[list[tuple[int, int]]] = [[]]
        for file_index, _, rows, _ in self.positions(start):
            for row in rows:
                if len(out[-1]) == batch_size:
                    if len(out) == count:
                        return out
                    out.append([])
                out[-1].append((file_index, int(row)))
        raise AssertionError("unreachable: the stream is endless")
