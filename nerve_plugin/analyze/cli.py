"""nerve-analyze: NerVE metrics of a trained model on text files; writes a table, JSON and a PNG heatmap.

    nerve-analyze path/to/hf_model corpus.txt --out analysis/
    nerve-analyze outputs/run/checkpoint corpus.txt --config run.toml --out analysis/

MODEL is a HuggingFace model directory (saved with save_pretrained; transformers needed) or a torchtitan
checkpoint (a step-N directory, a checkpoint folder, or a dump folder) with the run's TOML (--config) or
--model-name/--flavor. Arguments after "--" go to torchtitan's config parser (e.g. --training.seq_len 512).
Nothing is downloaded: models and tokenizers come from local paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .analyzer import NerVEAnalyzer
from .heatmap import write_heatmap
from .results import format_summary
from .text import hf_tokenizer, is_tiktoken_file, read_documents, tiktoken_tokenizer, windows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passthrough = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="nerve-analyze",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("model", help="HuggingFace model directory, or torchtitan checkpoint / dump folder")
    p.add_argument("text", nargs="+", help="UTF-8 text file(s); each is one document")
    p.add_argument("--out", default="nerve_analysis", help="output directory (default: %(default)s)")
    p.add_argument(
        "--tokenizer",
        help="HuggingFace tokenizer directory or tiktoken file (.tiktoken, "
        "tokenizer.model). Default: the HF model's own; torchtitan: the run's hf_assets_path "
        "tiktoken file, else nerve's shipped vocabulary",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sequence (default: HF: min(1024, the model's maximum); torchtitan: training.seq_len)",
    )
    p.add_argument("--max-tokens", type=int, default=65536, help="text tokens to read in all (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model weights and compute")
    p.add_argument("--layers", help="comma-separated block indices (default: all)")
    p.add_argument(
        "--layers-per-pass",
        type=int,
        help="layers measured per pass over the text (default: as many as fit in --max-stats-gib)",
    )
    p.add_argument(
        "--max-stats-gib",
        type=float,
        default=8.0,
        help="memory for the float64 covariance statistics of one pass (default: %(default)s)",
    )
    p.add_argument("--architecture", help="force a registered FFN layout (default: detected)")
    p.add_argument("--config", help="torchtitan: the run's TOML")
    p.add_argument("--model-name", help="torchtitan: model.name (overrides the TOML)")
    p.add_argument("--flavor", help="torchtitan: model.flavor (overrides the TOML)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="torchtitan nerve_llama: a [variant] option (repeatable; overrides the TOML)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(own)
    for name in ("seq_len", "max_tokens", "batch_size", "layers_per_pass"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args, passthrough


def log(args, message: str) -> None:
    if not args.quiet:
        print(f"nerve-analyze: {message}", file=sys.stderr, flush=True)


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


# What save_pretrained writes as weights: one file, or an index of shards.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_output_dir(out: Path) -> None:
    """Before any work: --out must be a folder that exists or can be made, and writable."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SystemExit(f"nerve-analyze: --out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"nerve-analyze: --out {out}: {existing} is not writable")


def load_hf(args):
    try:
        from transformers import AutoModel
    except ImportError:
        raise SystemExit("nerve-analyze: HuggingFace models need transformers: pip install 'nerve-plugin[hf]'")
    if not any((Path(args.model) / name).is_file() for name in HF_WEIGHTS):
        raise SystemExit(
            f"nerve-analyze: {args.model} holds config.json but no weights ({', '.join(HF_WEIGHTS[::2])} "
            f"or a sharded index): save the model there with save_pretrained"
        )
    try:
        model = AutoModel.from_pretrained(args.model, local_files_only=True, dtype=DTYPES[args.dtype])
    except OSError as error:  # transformers' messages run over several lines; the first says what is wrong
        raise SystemExit(f"nerve-analyze: loading {args.model} failed: {str(error).strip().splitlines()[0]}")
    config = model.config
    limit = next(
        (
            getattr(config, k)
            for k in ("max_position_embeddings", "n_positions", "n_ctx")
            if isinstance(getattr(config, k, None), int)
        ),
        1024,
    )
    try:
        source = (
            tiktoken_tokenizer(args.tokenizer)
            if args.tokenizer and is_tiktoken_file(args.tokenizer)
            else hf_tokenizer(args.tokenizer or args.model)
        )
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"nerve-analyze: no tokenizer in {args.tokenizer or args.model} "
            f"({str(error).strip().splitlines()[0]}): pass --tokenizer, or save the model's tokenizer there"
        )
    seq_len = args.seq_len or min(1024, limit)
    if seq_len > limit:
        raise SystemExit(f"nerve-analyze: --seq-len {seq_len} exceeds the model's {limit} positions")
    return model, source, seq_len, getattr(config, "vocab_size", None)


def load_torchtitan(args, passthrough):
    from nerve_plugin.torchtitan.v0_2.checkpoint import load_checkpoint
    from nerve_plugin.tokenizer import find_tokenizer_file

    variant = {}
    for item in args.variant:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"nerve-analyze: --variant expects KEY=VALUE, got {item!r}")
        variant[key] = value
    if args.config is None and (args.model_name is None or args.flavor is None):
        raise SystemExit(
            "nerve-analyze: a torchtitan checkpoint needs the run's TOML (--config) or --model-name and --flavor"
        )
    loaded = load_checkpoint(
        args.model, args.config, model_name=args.model_name, flavor=args.flavor, variant=variant, overrides=passthrough
    )
    log(args, f"loaded {loaded.model_name} / {loaded.flavor} from {loaded.step_dir}")
    model = cast_floating(loaded.model, DTYPES[args.dtype])
    if args.tokenizer and not is_tiktoken_file(args.tokenizer):
        source = hf_tokenizer(args.tokenizer)
    else:
        source = tiktoken_tokenizer(args.tokenizer or find_tokenizer_file(loaded.job_config.model.hf_assets_path))
    seq_len = args.seq_len or loaded.job_config.training.seq_len
    return model, source, seq_len, getattr(loaded.model.model_args, "vocab_size", None), loaded


def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` for real floating tensors only: Module.to would also cast complex buffers (torchtitan's
    RoPE ``freqs_cis``) to real, dropping their imaginary part."""
    return model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args, passthrough)
    except ValueError as e:  # bad settings: CheckpointError, ArchitectureError, [variant] values, ...
        print(f"nerve-analyze: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    model_path = Path(args.model)
    if not model_path.exists():
        raise SystemExit(f"nerve-analyze: {model_path} does not exist")
    for text in args.text:
        if not Path(text).is_file():
            raise SystemExit(f"nerve-analyze: text file {text} does not exist")
    check_output_dir(Path(args.out))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    start = time.perf_counter()
    loaded = None
    if is_hf_dir(model_path):
        if passthrough:
            raise SystemExit("nerve-analyze: arguments after '--' are for torchtitan checkpoints only")
        log(args, f"loading HuggingFace model {model_path}")
        model, source, seq_len, vocab = load_hf(args)
    else:
        log(args, f"loading torchtitan checkpoint {model_path}")
        model, source, seq_len, vocab, loaded = load_torchtitan(args, passthrough)
    model.to(device)

    documents = read_documents(args.text, source, args.max_tokens)
    input_ids, mask = windows(documents, seq_len, source)
    top = int(input_ids.max())
    if vocab is not None and top >= vocab:
        raise SystemExit(
            f"nerve-analyze: the tokenizer ({source.name}) produced id {top}, but the model has "
            f"{vocab} token embeddings: pass the tokenizer the model was trained with (--tokenizer)"
        )
    log(
        args,
        f"{int(mask.sum())} tokens from {len(documents)} file(s) ({source.name}) in {input_ids.shape[0]} "
        f"sequences of {seq_len}",
    )

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    analyzer = NerVEAnalyzer(model, args.architecture, layers=layers, name=str(model_path))
    results = analyzer.analyze(
        input_ids,
        mask,
        batch_size=args.batch_size,
        layers_per_pass=args.layers_per_pass,
        max_stats_gib=args.max_stats_gib,
        progress=not args.quiet,
    )

    out = Path(args.out)
    table = format_summary(results)
    record = results.to_dict()
    record["settings"] = {
        "text": [str(t) for t in args.text],
        "tokenizer": source.name,
        "seq_len": seq_len,
        "sequences": int(input_ids.shape[0]),
        "batch_size": args.batch_size,
        "device": str(device),
        "dtype": args.dtype,
        "checkpoint": str(loaded.step_dir) if loaded else None,
    }
    try:  # checked at the start, but a disk can fill up or a folder change meanwhile
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.txt").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        backend = write_heatmap(results, out / "heatmap.png")
    except OSError as error:
        raise SystemExit(f"nerve-analyze: writing to --out {out} failed: {error}")
    print(table)
    print(
        f"\nwrote {out / 'summary.txt'}, {out / 'results.json'}, {out / 'heatmap.png'} ({backend}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
