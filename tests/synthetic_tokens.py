"""The synthetic token stream both torchtitan harnesses train on (tt_synthetic for 0.2.2, tt030 for 0.3.0).

Sample i of the global stream is ``seq_len + 1`` token ids drawn from a generator seeded with (DATA_SEED + i);
dp rank r of W takes samples r, r + W, r + 2W, ... So any dp degree sees the same global batches (as sets), and a
1-process run with local_batch_size B*W is comparable with a W-rank run with B.
"""

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

DATA_SEED = 1234
VOCAB = 1024  # < every llama3 flavor's vocab_size (debugmodel: 2048)


class SyntheticTokens(IterableDataset, Stateful):
    """Endless deterministic random token stream, sharded by dp rank."""

    def __init__(self, seq_len: int, dp_rank: int = 0, dp_world_size: int = 1):
        self.seq_len, self.dp_rank, self.dp_world_size = seq_len, dp_rank, dp_world_size
        self.consumed = 0  # samples this rank has yielded: the whole state

    def sample(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(DATA_SEED + i)
        return torch.randint(0, VOCAB, (self.seq_len + 1,), generator=g)

    def __iter__(self):
        while True:
            x = self.sample(self.consumed * self.dp_world_size + self.dp_rank)
            self.consumed += 1
            yield {"input": x[:-1]}, x[1:]

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state_dict):
        self.consumed = state_dict["consumed"]
