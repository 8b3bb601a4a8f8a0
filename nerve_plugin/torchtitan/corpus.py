"""Offline default training data: the Python standard library's own source code.

Every machine that runs the trainer has a Python, hence ~12 MB of .py files (CPython 3.11,
test suites excluded): enough real text to pre-train a debug-sized model with no network.
`training.dataset_path` (a directory or a text file) replaces it with your own files.
"""

import os
import random
import sysconfig
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

# Test suites are full of deliberately odd files (bad encodings, huge literals); third-party
# packages differ from machine to machine.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TEXT_SUFFIXES = (".txt", ".py", ".md")


def _walk(root: Path, suffixes: tuple[str, ...], skip_dirs: set[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(suffixes)]
    # Sort by relative posix path: the same order on every machine and every rank.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> list[Path]:
    """The stdlib's .py files, sorted, without test suites and site-packages."""
    return _walk(Path(sysconfig.get_paths()["stdlib"]), (".py",), _SKIP_DIRS)


def corpus_files(dataset_path: str | None = None) -> list[Path]:
    """`dataset_path` (a text file, or a directory's *.txt/*.py/*.md files), else the stdlib."""
    if not dataset_path:
        return stdlib_files()
    path = Path(dataset_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _walk(path, TEXT_SUFFIXES, {"__pycache__"})
        if files:
            return files
        raise FileNotFoundError(f"No {'/'.join(TEXT_SUFFIXES)} files under {path}")
    raise FileNotFoundError(f"training.dataset_path={dataset_path!r} does not exist")


def read_document(path: Path) -> str:
    # A stray non-UTF-8 byte should cost one replacement character, not the run.
    return path.read_text(encoding="utf-8", errors="replace")


class CorpusDataset(IterableDataset, Stateful):
    """Files as documents, tokenized lazily as <bos> doc <eos>, packed into seq_len+1 windows.

    Each epoch visits the files in a fixed pseudo-random order (the same on all ranks, so a
    sorted corpus doesn't feed the model one package at a time), and rank r of W takes files
    r, r+W, r+2W, ... of it: ranks never see the same document in an epoch. Consecutive
    windows overlap by one token so every token is the label of exactly one position.

    State = (epoch, next file of this shard, tokens read but not yet emitted): small, and
    a resume re-reads nothing that was already trained on.
    """

    def __init__(
        self,
        files: list[Path],
        tokenizer: BaseTokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        infinite: bool = True,
        seed: int = 0,
    ):
        if len(files) < dp_world_size:
            raise ValueError(
                f"{len(files)} documents can't be sharded over {dp_world_size} data-parallel "
                "ranks: point training.dataset_path at a directory with more files"
            )
        self.files = [str(f) for f in files]
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.infinite = infinite
        self.seed = seed
        self._epoch = 0
        self._next_doc = 0
        self._buffer: list[int] = []  # tokens read; self._buffer[self._start:] not yet emitted
        self._start = 0

    def _shard(self, epoch: int) -> list[str]:
        order = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        # With dataloader workers, each worker is a sub-shard of this rank's shard.
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        start, step = self.dp_rank * n_workers + worker, self.dp_world_size * n_workers
        return [self.files[i] for i in order[start::step]]

    def __iter__(self):
        window = self.seq_len + 1
        while True:
            docs = self._shard(self._epoch)
            if not docs:
                raise ValueError("This data shard is empty: fewer documents than ranks x workers")
            while self._next_doc < len(docs):
                text = read_document(Path(docs[self._next_doc]))
                # Trim emitted tokens once per document, not per window: a 700 KB file would
                # make per-window trimming quadratic.
                self._buffer = self._buffer[self._start :]
                self._buffer += self.tokenizer.encode(text, add_bos=True, add_eos=True)
                self._start = 0
                self._next_doc += 1
                while len(self._buffer) - self._start >= window:
                    x = torch.tensor(self._buffer[self._start : self._start + window])
                    self._start += self.seq_len  # before the yield: state_dict sees it
                    yield {"input": x[:-1]}, x[1:]
            if not self.infinite:
                logger.warning(f"Corpus of {len(self.files)} files exhausted on dp rank {self.dp_rank}")
                return
            self._epoch += 1
            self._next_doc = 0
            logger.info(f"Corpus re-looped on dp rank {self.dp_rank}: epoch {self._epoch}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "next_doc": self._next_doc,
            "buffer": self._buffer[self._start :],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = state_dict["epoch"]
        self._next_doc = state_dict["next_doc"]
        self._buffer = list(state_dict["buffer"])
        self._start = 0


def build_corpus_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer,
    job_config,
    infinite: bool = True,
) -> ParallelAwareDataloader:
    """TrainSpec.build_dataloader_fn: the stdlib corpus, or `training.dataset_path`."""
    dataset_path = job_config.training.dataset_path
    files = corpus_files(dataset_path)
    logger.info(
        f"Corpus: {len(files)} files from {dataset_path or 'the Python stdlib'}"
        f" ({files[0]} ... {files[-1]}), dp rank {dp_rank}/{dp_world_size}"
    )
    dataset = CorpusDataset(
        files,
        tokenizer,
        seq_len=job_config.training.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
        seed=job_config.debug.seed or 0,
    )
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        batch_size=job_config.training.local_batch_size,
        **asdict(job_config.training.dataloader),
    )
