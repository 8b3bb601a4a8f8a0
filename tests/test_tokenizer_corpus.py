"""The offline data path: shipped BPE vocab, tiktoken tokenizer, BPE tool, stdlib corpus loader."""

import importlib.util
import random
import sysconfig
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchtitan.config import JobConfig

from nerve_plugin.torchtitan.corpus import build_corpus_dataloader, corpus_files, stdlib_files
from nerve_plugin.tokenizer import LLAMA3_SPECIAL_TOKENS, write_tiktoken_ranks
from nerve_plugin.torchtitan.tokenizer import SHIPPED_VOCAB, TiktokenTokenizer, build_tiktoken_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("build_vocab", ROOT / "tools" / "build_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_vocab = _load_tool()


@pytest.fixture(scope="module")
def tok():
    return TiktokenTokenizer(SHIPPED_VOCAB)


def _job_config(**training) -> JobConfig:
    jc = JobConfig()
    jc.model.hf_assets_path = "/nonexistent/hf_assets"
    for k, v in training.items():
        setattr(jc.training, k, v)
    return jc


# ---------------------------------------------------------------- tokenizer


def test_shipped_vocab(tok):
    assert SHIPPED_VOCAB.stat().st_size < 100_000
    assert tok.get_vocab_size() == tok.vocab_size <= 2048
    assert tok.num_ranks + len(tok.special_tokens) == tok.get_vocab_size()
    assert (tok.bos_id, tok.eos_id) == (tok.num_ranks, tok.num_ranks + 1)
    assert tok.decode([tok.bos_id]) == "<|begin_of_text|>"
    # Actually compresses Python (not just 256 bytes).
    src = Path(random.__file__).read_text()
    assert len(tok.encode(src)) < len(src.encode()) / 2.5


def test_roundtrip(tok):
    rng = random.Random(0)
    texts = [
        "",
        "def f(x):\n\treturn x ** 2  # héllo 世界 🚀\r\n",
        "\x00\x01\x7f\u200b\ufeff  trailing   \n\n\n",
        " " * 300_000 + "x" * 30_000,  # a run long enough to overflow tiktoken's regex stack
        bytes(range(256)).decode("latin-1"),
        "".join(chr(rng.choice([rng.randrange(0x20, 0x800), rng.randrange(0xE000, 0x10FFFF)])) for _ in range(3000)),
    ]
    for text in texts:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < tok.num_ranks for i in ids[1:-1])
        assert tok.decode(ids[1:-1]) == text


def test_specials_never_from_text(tok):
    text = "a" + "".join(tok.special_tokens) + "<|end_of_text|>\n"
    ids = tok.encode(text)
    assert max(ids) < tok.num_ranks
    assert tok.decode(ids) == text
    assert tok.encode("<|begin_of_text|>", add_bos=True).count(tok.bos_id) == 1


def test_llama3_tokenizer_model_layout(tmp_path):
    # A miniature Llama-3 tokenizer.model: 256 bytes + 44 merges; specials follow the ranks.
    ranks = {bytes([i]): i for i in range(256)}
    for word in ["th", "he", "the", "in", "an", "er", " t", " the", "on", "at"] + [f"x{i}" for i in range(34)]:
        ranks.setdefault(word.encode(), len(ranks))
    assert len(ranks) == 300
    (tmp_path / "llama").mkdir()
    write_tiktoken_ranks(ranks, tmp_path / "llama" / "tokenizer.model")

    jc = _job_config()
    jc.model.hf_assets_path = str(tmp_path / "llama")
    tok = build_tiktoken_tokenizer(jc)
    assert tok.get_vocab_size() == 300 + 256
    assert (tok.bos_id, tok.eos_id) == (300, 301)
    ids = {name: tok.special_tokens[name] for name in LLAMA3_SPECIAL_TOKENS}
    assert ids["<|start_header_id|>"] == 306 and ids["<|end_header_id|>"] == 307
    assert ids["<|eot_id|>"] == 309 and ids["<|reserved_special_token_250|>"] == 555
    assert tok.encode(" the") == [ranks[b" the"]]
    assert tok.decode([309]) == "<|eot_id|>"


def test_builder_resolution(tmp_path, tok):
    jc = _job_config()
    assert build_tiktoken_tokenizer(jc).path == str(SHIPPED_VOCAB)  # missing path: fallback
    jc.model.hf_assets_path = str(tmp_path)
    assert build_tiktoken_tokenizer(jc).path == str(SHIPPED_VOCAB)  # nothing usable inside
    ranks = {bytes([i]): i for i in range(256)}
    write_tiktoken_ranks(ranks, tmp_path / "mine.tiktoken")
    got = build_tiktoken_tokenizer(jc)
    assert got.path == str(tmp_path / "mine.tiktoken")
    assert (got.get_vocab_size(), got.bos_id) == (256 + 16, 256)


# ---------------------------------------------------------------- BPE tool

TOY = [
    "the cat sat on the mat. the cat ate the rat!\n",
    "aaaa aaa abab ababab 12345 123 1234\n",
    "def the_cat(self):\n    return self.mat  # ünïcödé\n",
]


def test_bpe_merges_are_most_frequent_pairs():
    counts = build_vocab.count_chunks(TOY * 3)
    ranks, merges = build_vocab.train_bpe(counts, 256 + 12)
    assert len(ranks) == 256 + 12 and sorted(ranks.values()) == list(range(len(ranks)))
    words = {tuple(bytes([b]) for b in chunk): n for chunk, n in counts.items()}
    for left, right in merges:
        pairs = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        best = max(pairs.values())
        assert pairs[(left, right)] == best
        assert (left, right) == min(p for p, c in pairs.items() if c == best)  # tie-break
        merged = {}
        for w, n in words.items():
            out, j = [], 0
            while j < len(w):
                if w[j : j + 2] == (left, right):
                    out.append(left + right)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            merged[tuple(out)] = n
        words = merged


def test_build_vocab_tool_is_deterministic(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TOY * 4):
        (corpus / f"doc{i:02d}.txt").write_text(text * (i + 1))
    outs = [tmp_path / "a.tiktoken", tmp_path / "b.tiktoken"]
    for out in outs:
        build_vocab.main([str(out), "--dataset-path", str(corpus), "--num-ranks", "300"])
    assert outs[0].read_bytes() == outs[1].read_bytes()
    tok = TiktokenTokenizer(outs[0])
    assert tok.num_ranks == 300 and tok.decode(tok.encode(TOY[2])) == TOY[2]
    assert len(tok.encode("the cat")) < len(b"the cat")


# ---------------------------------------------------------------- corpus loader


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    for i in range(10):
        (root / f"f{i}.md").write_text(f"# file {i}\n" + f"line {i} of some text\n" * (5 + 3 * i))
    (root / "skip.json").write_text("not text")
    return root


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_default_corpus_is_the_stdlib():
    files = stdlib_files()
    names = {f.name for f in files}
    assert len(files) > 300 and {"os.py", "argparse.py"} <= names
    root = Path(sysconfig.get_paths()["stdlib"])
    dirs = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert dirs.isdisjoint({"test", "tests", "idle_test", "site-packages", "__pycache__"})
    assert files == sorted(files, key=lambda f: f.relative_to(root).as_posix())
    assert corpus_files(None) == files


def test_stdlib_loader_is_lazy(tok):
    t0 = time.perf_counter()
    ((batch, labels),) = _take(build_corpus_dataloader(1, 0, tok, _job_config(seq_len=512, local_batch_size=4)), 1)
    assert time.perf_counter() - t0 < 5  # tokenizing all 12 MB would be far slower
    assert batch["input"].shape == labels.shape == (4, 512)


def test_shapes_shift_and_sharding(tok, text_dir):
    jc = _job_config(dataset_path=str(text_dir), seq_len=16, local_batch_size=2)
    assert [f.name for f in corpus_files(str(text_dir))] == [f"f{i}.md" for i in range(10)]
    per_rank = []
    for rank in range(2):
        loader = build_corpus_dataloader(dp_world_size=2, dp_rank=rank, tokenizer=tok, job_config=jc)
        batches = _take(loader, 12)  # more than one epoch of each shard: exercises re-looping
        prev_label = None
        for inputs, labels in batches:
            x = inputs["input"]
            assert x.shape == labels.shape == (2, 16) and x.dtype == labels.dtype == torch.long
            assert torch.equal(x[:, 1:], labels[:, :-1])
            for row in range(2):  # the stream is contiguous: windows overlap by one token
                if prev_label is not None:
                    assert x[row, 0] == prev_label
                prev_label = labels[row, -1]
        per_rank.append(torch.cat([torch.cat([b[0]["input"], b[1]], 1) for b in batches[:2]]))
        ds = loader.dataset
        first_epoch_docs = {Path(d).name for d in ds._shard(0)}
        assert ds._shard(0) != ds._shard(1)  # each epoch reshuffles
        per_rank.append(first_epoch_docs)
    assert not torch.equal(per_rank[0], per_rank[2])
    assert per_rank[1].isdisjoint(per_rank[3]) and len(per_rank[1] | per_rank[3]) == 10


@pytest.mark.parametrize("resume_after", [0, 1, 5, 17])
def test_resume_gives_exactly_the_next_batch(tok, text_dir, resume_after):
    jc = _job_config(dataset_path=str(text_dir), seq_len=16, local_batch_size=3)
    reference = _take(build_corpus_dataloader(2, 1, tok, jc), resume_after + 3)

    loader = build_corpus_dataloader(2, 1, tok, jc)
    it = iter(loader)
    for _ in range(resume_after):
        next(it)
    state = loader.state_dict()

    resumed = build_corpus_dataloader(2, 1, tok, jc)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for inputs, labels in reference[resume_after:]:
        got_inputs, got_labels = next(it)
        assert torch.equal(got_inputs["input"], inputs["input"]) and torch.equal(got_labels, labels)


def test_finite_loader_ends(tok, text_dir):
    jc = _job_config(dataset_path=str(text_dir), seq_len=16, local_batch_size=1)
    n = sum(1 for _ in build_corpus_dataloader(1, 0, tok, jc, infinite=False))
    total = sum(len(tok.encode(f.read_text(), add_bos=True, add_eos=True)) for f in corpus_files(str(text_dir)))
    assert n == (total - 1) // 16


def _parsed_job_config(*args):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(
        ["--job.custom_config_module", "nerve_plugin.torchtitan.config", "--model.name", "llama3", *args]
    )


def test_missing_tokenizer_or_dataset_paths_name_the_path_and_the_offline_dataset(tmp_path, monkeypatch):
    # torchtitan's own debug TOML: its source tree's tokenizer and c4_test, which its wheel does not ship
    import nerve_plugin.torchtitan  # noqa: F401  registers nerve's specs
    from torchtitan.protocols.train_spec import get_train_spec

    monkeypatch.chdir(tmp_path)
    spec = get_train_spec("llama3")
    offline = 'training.dataset = "python_stdlib" (--training.dataset python_stdlib'
    config = _parsed_job_config("--model.hf_assets_path", "./tests/assets/tokenizer", "--training.dataset", "c4_test")
    with pytest.raises(FileNotFoundError) as error:
        spec.build_tokenizer_fn(config)
    assert str(error.value).startswith(
        "model.hf_assets_path = './tests/assets/tokenizer' does not exist: set it to a folder holding the tokenizer"
    )
    assert offline in str(error.value) and "download" not in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        spec.build_dataloader_fn(1, 0, None, config)
    assert str(error.value).startswith(
        f"training.dataset = 'c4_test' reads 'tests/assets/c4_test', which does not exist (relative to {tmp_path})"
    )
    assert offline in str(error.value)
    config = _parsed_job_config("--training.dataset", "c4", "--training.dataset_path", "./my_c4")
    with pytest.raises(FileNotFoundError, match=r"^training.dataset_path = './my_c4' does not exist"):
        spec.build_dataloader_fn(1, 0, None, config)
    # the offline dataset needs neither: nerve's vocabulary when hf_assets_path holds no tiktoken file
    config = _parsed_job_config(
        "--model.hf_assets_path", "./tests/assets/tokenizer", "--training.dataset", "python_stdlib"
    )
    assert spec.build_tokenizer_fn(config).get_vocab_size() == 2048
