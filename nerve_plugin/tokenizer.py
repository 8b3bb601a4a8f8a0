"""Offline byte-level BPE tokenizer, backed by tiktoken (no torchtitan: the analyzer uses it too;
nerve_plugin/torchtitan/tokenizer.py makes it torchtitan's tokenizer).

Reads any vocabulary in tiktoken's file format (one `base64(token) rank` per line):
  * the vocabulary shipped with nerve (nerve_plugin/assets/stdlib_bpe.tiktoken, 2032 ranks
    + 16 specials = 2048 = llama3 debugmodel's vocab_size), built by tools/build_vocab.py;
  * a Llama-3 `tokenizer.model` (128000 ranks + 256 specials = 128256).
Both use Llama-3's pre-tokenisation regex and Llama-3's special-token layout: specials get
the ids right after the last regular rank, so <|begin_of_text|> = n_ranks, <|end_of_text|> =
n_ranks + 1, <|start_header_id|> = n_ranks + 6, <|eot_id|> = n_ranks + 9, ...
"""

import base64
import os
import re
from pathlib import Path

import tiktoken

# Llama-3's pattern (cl100k's, but digits in groups of up to 3).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta's original Llama-3 layout: 256 specials, the named ones interleaved with reserved slots.
LLAMA3_NUM_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL - 5)]
assert len(LLAMA3_SPECIAL_TOKENS) == LLAMA3_NUM_SPECIAL

# The shipped vocabulary keeps the same layout, truncated: a 2048-token model can't spare 256 ids.
NERVE_NUM_SPECIAL = 16
NERVE_SPECIAL_TOKENS = LLAMA3_SPECIAL_TOKENS[:NERVE_NUM_SPECIAL]
NERVE_VOCAB_SIZE = 2048  # llama3 debugmodel's vocab_size

SHIPPED_VOCAB = Path(__file__).resolve().parent / "assets" / "stdlib_bpe.tiktoken"

# tiktoken's regex backtracking overflows (ValueError) on very long runs of whitespace (~>200k
# chars); such texts are re-encoded with every long run cut into pieces. Normal text never is.
_MAX_RUN = 25_000
# The lookbehinds anchor matches at run starts, keeping the scan linear.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (_MAX_RUN, _MAX_RUN))


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken-format file: `base64(token bytes) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" %d\n" % rank)


def _split_long_runs(text: str):
    start = 0
    for m in _LONG_RUN.finditer(text):
        for cut in range(m.start(), m.end(), _MAX_RUN):
            if cut > start:
                yield text[start:cut]
                start = cut
    yield text[start:]


class TiktokenTokenizer:
    """Byte-level BPE over a tiktoken-format vocabulary, with Llama-3-style specials.

    Args:
        path: a tiktoken-format file.
        special_tokens: names of the specials, given ids max_rank+1, max_rank+2, ... Default:
            Llama-3's 256 for a file named `tokenizer.model`, else nerve's 16.
    """

    def __init__(self, path: str | os.PathLike, special_tokens: list[str] | None = None):
        self.path = str(path)
        ranks = load_tiktoken_ranks(path)
        if special_tokens is None:
            is_llama3 = os.path.basename(self.path) == "tokenizer.model"
            special_tokens = LLAMA3_SPECIAL_TOKENS if is_llama3 else NERVE_SPECIAL_TOKENS
        first_special = max(ranks.values()) + 1
        self.special_tokens = {t: first_special + i for i, t in enumerate(special_tokens)}
        self.model = tiktoken.Encoding(
            name=Path(self.path).name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.num_ranks = len(ranks)
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.bos_id = self.special_tokens[self.bos_token]
        self.eos_id = self.special_tokens[self.eos_token]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # allowed_special=() and disallowed_special=() together: "<|end_of_text|>" written in a
        # document is just text, never the control token (and never an exception).
        ids = [self.bos_id] if add_bos else []
        try:
            ids += self.model.encode(text, allowed_special=set(), disallowed_special=())
        except ValueError:
            for piece in _split_long_runs(text):
                ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int] | int) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self.model.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    def get_vocab_size(self) -> int:
        return self.model.n_vocab


def find_tokenizer_file(path: str | None) -> str | None:
    """A tiktoken-format file at `path`, or inside the directory `path`; None if there is none."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return path
    # HF snapshots of Llama-3 keep Meta's tiktoken file under original/.
    for name in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(p for p in os.listdir(path) if p.endswith(".tiktoken"))
    return os.path.join(path, found[0]) if found else None
