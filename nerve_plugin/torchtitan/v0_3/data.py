"""nerve's offline corpus and vocabulary as torchtitan 0.3.0 components: ``CorpusDataLoader.Config`` and
``CorpusTokenizer.Config`` for a ``Trainer.Config``'s ``dataloader`` and ``tokenizer`` (0.2.2 selects them with
``training.dataset = "python_stdlib"``). The dataset itself is version-neutral (../corpus.py)."""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from nerve_plugin.torchtitan.corpus import CorpusDataset, corpus_files
from nerve_plugin.torchtitan.tokenizer import SHIPPED_VOCAB, TiktokenTokenizer, find_tokenizer_file

CORPUS_DATASET = "python_stdlib"


class CorpusTokenizer(TiktokenTokenizer):
    """The tiktoken file in ``hf_assets_path`` if it holds one, otherwise the vocabulary nerve ships (2048
    tokens, the debug models' vocab_size)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config | None = None, *, tokenizer_path: str = ""):
        found = find_tokenizer_file(tokenizer_path) if tokenizer_path else None
        if found is None:
            logger.info(f"No tiktoken file at hf_assets_path={tokenizer_path!r}: using the shipped {SHIPPED_VOCAB}")
            found = SHIPPED_VOCAB
        super().__init__(found)


class CorpusDataLoader(ParallelAwareDataloader):
    """The Python standard library's source (or ``dataset_path``: a folder or a text file) as documents, packed
    into ``seq_len + 1`` windows; rank r of W reads files r, r + W, ... of each epoch's shuffled order."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = CORPUS_DATASET
        """Only "python_stdlib": the corpus is the files of dataset_path, or the standard library's."""

        seed: int = 0
        """Seed of each epoch's file order."""

        def __post_init__(self):
            if self.dataset != CORPUS_DATASET:
                raise ValueError(
                    f"dataloader.dataset = {self.dataset!r} is not allowed for nerve's corpus: expected "
                    f"{CORPUS_DATASET!r} (its files: dataloader.dataset_path, or the Python standard library)"
                )

    def __init__(self, config: Config, *, dp_world_size, dp_rank, tokenizer, seq_len, local_batch_size, **kwargs):
        files = corpus_files(config.dataset_path)
        logger.info(
            f"Corpus: {len(files)} files from {config.dataset_path or 'the Python stdlib'}"
            f" ({files[0]} ... {files[-1]}), dp rank {dp_rank}/{dp_world_size}"
        )
        dataset = CorpusDataset(
            files, tokenizer, seq_len=seq_len, dp_rank=dp_rank, dp_world_size=dp_world_size, seed=config.seed
        )
        options = {"num_workers": config.num_workers, "pin_memory": config.pin_memory}
        if config.num_workers > 0:
            options.update(persistent_workers=config.persistent_workers, prefetch_factor=config.prefetch_factor)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size, **options)
