#!/usr/bin/env python3
"""Train a small byte-level BPE vocabulary in tiktoken's file format.

The shipped nerve_plugin/assets/stdlib_bpe.tiktoken was built from CPython 3.11.7's standard
library (734 .py files, 12.1 MB, test suites excluded; see nerve_plugin/torchtitan/corpus.py):

    python tools/build_vocab.py nerve_plugin/assets/stdlib_bpe.tiktoken

2032 ranks (256 single bytes + 1776 merges) + the tokenizer's 16 specials = 2048, llama3
debugmodel's vocab_size. Another Python's stdlib gives a slightly different (equally good) file.

The algorithm is textbook BPE as in GPT-2/tiktoken: split text with Llama-3's regex so merges
never cross word/number/punctuation boundaries, count the distinct chunks once, then repeatedly
merge the most frequent adjacent token pair. Pair counts are updated incrementally, touching
only the chunks that contain the merged pair, so the stdlib trains in seconds.
"""

import argparse
import heapq
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex  # tiktoken's own dependency; Python's `re` has no \p{L}

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nerve_plugin.torchtitan.corpus import corpus_files, read_document  # noqa: E402
from nerve_plugin.tokenizer import (  # noqa: E402
    LLAMA3_PAT_STR,
    NERVE_NUM_SPECIAL,
    NERVE_VOCAB_SIZE,
    write_tiktoken_ranks,
)


def count_chunks(texts) -> Counter:
    """Pre-tokenise: {utf-8 bytes of each regex chunk: occurrences}."""
    pat = regex.compile(LLAMA3_PAT_STR)
    counts = Counter()
    for text in texts:
        counts.update(pat.findall(text))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def train_bpe(chunk_counts: dict[bytes, int], num_ranks: int):
    """Returns (ranks {token bytes: rank}, merges [(left bytes, right bytes)] in order).

    Ties between equally frequent pairs go to the smaller (left bytes, right bytes): the
    result depends only on the counts, never on dict or set order.
    """
    vocab = [bytes([i]) for i in range(256)]  # rank -> bytes
    rank_of = {b: i for i, b in enumerate(vocab)}
    chunks = sorted(chunk_counts)
    words = [list(c) for c in chunks]  # each chunk as a list of ranks, bytes at first
    freqs = [chunk_counts[c] for c in chunks]

    pair_count = defaultdict(int)
    where = defaultdict(set)  # pair -> indices of words that contained it (may be stale)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)

    def entry(pair):
        return (-pair_count[pair], vocab[pair[0]], vocab[pair[1]], pair)

    # Max-heap with lazy deletion: an entry is live only if its count is still current.
    heap = [entry(p) for p in pair_count]
    heapq.heapify(heap)
    merges = []
    while len(vocab) < num_ranks and heap:
        neg_count, left, right, pair = heapq.heappop(heap)
        if -neg_count != pair_count.get(pair, 0) or neg_count == 0:
            continue
        merged = left + right
        # The same bytes can arise from two different splits ("ab"+"c", "a"+"bc"): reuse the
        # rank so every rank decodes to distinct bytes (tiktoken maps bytes -> one rank).
        new = rank_of.get(merged)
        if new is None:
            new = rank_of[merged] = len(vocab)
            vocab.append(merged)
        merges.append((left, right))

        delta = defaultdict(int)
        for i in where.pop(pair):
            w, out, j = words[i], [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == len(w):
                continue  # stale entry: an earlier merge already consumed the pair here
            for p in zip(w, w[1:]):
                delta[p] -= freqs[i]
            for p in zip(out, out[1:]):
                delta[p] += freqs[i]
                where[p].add(i)
            words[i] = out
        for p, d in delta.items():
            if d:
                pair_count[p] += d
                if pair_count[p] > 0:
                    heapq.heappush(heap, entry(p))
        assert pair_count.pop(pair) == 0
    return rank_of, merges


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="where to write the .tiktoken file")
    parser.add_argument(
        "--dataset-path",
        default=None,
        help="a text file or a directory of *.txt/*.py/*.md files (default: the Python stdlib)",
    )
    parser.add_argument(
        "--num-ranks",
        type=int,
        default=NERVE_VOCAB_SIZE - NERVE_NUM_SPECIAL,
        help="regular tokens incl. the 256 bytes (default: %(default)s = 2048 minus the 16 specials)",
    )
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    files = corpus_files(args.dataset_path)
    texts = [read_document(f) for f in files]
    chunk_counts = count_chunks(texts)
    t1 = time.perf_counter()
    ranks, merges = train_bpe(chunk_counts, args.num_ranks)
    write_tiktoken_ranks(ranks, args.output)
    t2 = time.perf_counter()
    size_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(
        f"Python {sys.version.split()[0]}: {len(files)} files, {size_mb:.1f} MB, "
        f"{len(chunk_counts)} distinct chunks ({t1 - t0:.1f}s); {len(merges)} merges -> "
        f"{len(ranks)} ranks ({t2 - t1:.1f}s); wrote {args.output} "
        f"({Path(args.output).stat().st_size / 1e3:.0f} KB)"
    )


if __name__ == "__main__":
    main()
