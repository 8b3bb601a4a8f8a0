"""nerve's offline BPE tokenizer (nerve_plugin/tokenizer.py) as torchtitan's tokenizer."""

from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from nerve_plugin.tokenizer import SHIPPED_VOCAB, find_tokenizer_file
from nerve_plugin.tokenizer import TiktokenTokenizer as _TiktokenTokenizer

__all__ = ["SHIPPED_VOCAB", "TiktokenTokenizer", "build_tiktoken_tokenizer", "find_tokenizer_file"]


class TiktokenTokenizer(_TiktokenTokenizer, BaseTokenizer):
    """The tiktoken tokenizer under torchtitan's tokenizer interface (its eos_id, encode, decode,
    get_vocab_size)."""


def build_tiktoken_tokenizer(job_config) -> TiktokenTokenizer:
    """TrainSpec.build_tokenizer_fn: `model.hf_assets_path` if it holds a tiktoken file,
    otherwise the vocabulary shipped with nerve (so the default job runs offline)."""
    path = job_config.model.hf_assets_path
    found = find_tokenizer_file(path)
    if found is None:
        logger.info(f"No tiktoken file at hf_assets_path={path!r}: using the shipped {SHIPPED_VOCAB}")
        found = SHIPPED_VOCAB
    tokenizer = TiktokenTokenizer(found)
    logger.info(
        f"Tokenizer {found}: {tokenizer.num_ranks} ranks + {len(tokenizer.special_tokens)} specials"
        f" = {tokenizer.get_vocab_size()}, bos_id={tokenizer.bos_id}, eos_id={tokenizer.eos_id}"
    )
    return tokenizer
