"""Text files -> fixed-length token windows for analysis.

Each file is one document: its tokens are cut into windows of ``seq_len``, each framed the way the tokenizer
frames a sequence (BERT: [CLS] ... [SEP]; LLaMA: <s> ...; GPT-2: nothing); a document's last window is
padded on the right and its padding masked out. Windows never span two files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

CHUNK_CHARS = 1 << 20  # text is tokenized a chunk at a time, so a token budget stops reading a large file early


@dataclass
class TokenSource:
    encode: Callable[[str], list[int]]  # plain text -> ids, no special tokens
    pad_id: int
    name: str
    prefix: list[int] = field(default_factory=list)  # framing of every window
    suffix: list[int] = field(default_factory=list)
    vocab_size: int | None = None


def hf_tokenizer(path: str | os.PathLike) -> TokenSource:
    """A HuggingFace tokenizer saved in a local directory (never downloaded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    prefix, suffix = _framing(tok)
    pad = next((i for i in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) if i is not None), 0)
    return TokenSource(
        encode=lambda text: tok(text, add_special_tokens=False, verbose=False)["input_ids"],
        pad_id=pad,
        name=f"HuggingFace tokenizer {path}",
        prefix=prefix,
        suffix=suffix,
        vocab_size=len(tok),
    )


def _framing(tok) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a sequence, found by encoding a probe text."""
    probe = "nerve probe text"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    framed = tok(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def tiktoken_tokenizer(path: str | os.PathLike | None = None) -> TokenSource:
    """nerve's tiktoken tokenizer (the shipped vocabulary by default), windows starting with <|begin_of_text|>
    as the python_stdlib training data's documents do."""
    from nerve_plugin.tokenizer import SHIPPED_VOCAB, TiktokenTokenizer

    tok = TiktokenTokenizer(path or SHIPPED_VOCAB)
    return TokenSource(
        encode=lambda text: tok.encode(text),
        pad_id=tok.eos_id,
        name=f"tiktoken {tok.path}",
        prefix=[tok.bos_id],
        vocab_size=tok.get_vocab_size(),
    )


def is_tiktoken_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and (path.suffix == ".tiktoken" or path.name == "tokenizer.model")


def read_documents(files: Iterable[str | os.PathLike], source: TokenSource, max_tokens: int) -> list[list[int]]:
    """The token ids of each file, stopping once ``max_tokens`` are read in all (specials not counted)."""
    documents, total = [], 0
    for file in files:
        ids: list[int] = []
        with open(file, encoding="utf-8", errors="replace") as f:
            carry = ""
            while total + len(ids) < max_tokens:
                chunk = f.read(CHUNK_CHARS)
                text = carry + chunk
                if not chunk:
                    ids += source.encode(text) if text else []
                    break
                cut = text.rfind("\n") + 1 or len(text)  # cut at a line end, so no word is split
                carry = text[cut:]
                ids += source.encode(text[:cut])
        ids = ids[: max_tokens - total]
        if ids:
            documents.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    return documents


def windows(documents: list[list[int]], seq_len: int, source: TokenSource) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, seq_len] input ids and attention mask (0 at padding)."""
    room = seq_len - len(source.prefix) - len(source.suffix)
    if room < 1:
        raise ValueError(
            f"seq_len {seq_len} leaves no room for text after the tokenizer's special tokens "
            f"{source.prefix + source.suffix}"
        )
    rows, masks = [], []
    for ids in documents:
        for start in range(0, len(ids), room):
            row = source.prefix + ids[start : start + room] + source.suffix
            rows.append(row + [source.pad_id] * (seq_len - len(row)))
            masks.append([1] * len(row) + [0] * (seq_len - len(row)))
    if not rows:
        raise ValueError("the text files hold no tokens")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
