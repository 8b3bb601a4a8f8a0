"""Test-only config registry for torchtitan 0.3.0 on CPU: ``--module tt030 --config tiny`` (tests/ on PYTHONPATH).

The 0.3.0 counterpart of tt_synthetic: torchtitan's llama3 debugmodel as nerve's ``NerveTrainer.Config`` (through
nerve's registry), made to train on CPU processes and to be comparable across parallelisms:
  - CPU mode, on by importing nerve's registry (and NerveTrainer's causal SDPA in place of FlexAttention);
  - no tokenizer files (a stand-in that only knows the vocabulary size) and the synthetic token stream of
    synthetic_tokens.py, so any dp degree sees the same global batches;
  - weights that do not depend on the parallelism: each parameter starts as that of an unsharded model
    initialised from INIT_SEED (on CPU, DTensor random init draws each shard from the rank's own generator);
  - each logged step's exact loss and grad norm appended to ``<dump_folder>/metrics_rank<R>.jsonl`` (torchtitan's
    log line rounds them).
"""

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from nerve_plugin.taps import canonical_name
from nerve_plugin.torchtitan.v0_3.config_registry import as_nerve_config  # first: it turns CPU mode on
from nerve_plugin.torchtitan.v0_3.trainer import config_values
from synthetic_tokens import VOCAB, SyntheticTokens
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.tokenizer import BaseTokenizer


INIT_SEED = 42


class VocabularyOnly(BaseTokenizer):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config=None, *, tokenizer_path: str = ""):
        super().__init__()

    def encode(self, *args, **kwargs):
        raise NotImplementedError("the synthetic stream needs no tokenizer")

    def decode(self, *args, **kwargs):
        raise NotImplementedError("the synthetic stream needs no tokenizer")

    def get_vocab_size(self) -> int:
        return VOCAB


class SyntheticDataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        pass

    def __init__(self, config, *, dp_world_size, dp_rank, tokenizer, seq_len, local_batch_size, **kwargs):
        dataset = SyntheticTokens(seq_len, dp_rank, dp_world_size)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size)


class JsonlMetricsProcessor(MetricsProcessor):
    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pass

    def __init__(self, config, *, dump_folder: str = "./outputs", **kwargs):
        super().__init__(config, dump_folder=dump_folder, **kwargs)
        self.exact_dump_folder = dump_folder

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = os.path.join(self.exact_dump_folder, f"metrics_rank{rank}.jsonl")
        loss, max_loss = (float(v) for v in (global_avg_loss, global_max_loss))
        with open(path, "a") as f:
            f.write(
                json.dumps({"step": step, "loss": loss, "max_loss": max_loss, "grad_norm": float(grad_norm)}) + "\n"
            )


def _seeded_init(model, model_config):
    torchtitan_init = model.init_weights

    @torch.no_grad()
    def init_weights(*args, **kwargs):
        torchtitan_init(*args, **kwargs)  # buffers (the RoPE table)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(INIT_SEED)
            reference = model_config.build()
            reference.init_weights()
        full = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            w = full[canonical_name(name)]  # wrappers (activation checkpointing, compile) add name components
            if isinstance(p, DTensor):  # keep this rank's slice, no communication
                p.to_local().copy_(distribute_tensor(w, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(w)

    model.init_weights = init_weights


def _cpu_model_spec(spec):
    torchtitan_parallelize = spec.parallelize_fn

    def parallelize(model, **kwargs):
        _seeded_init(model, spec.model)
        return torchtitan_parallelize(model, **kwargs)

    return dataclasses.replace(spec, parallelize_fn=parallelize)


def tiny():
    """llama3 debugmodel (6 blocks, FFN 768) on 4 sequences of 64 synthetic tokens a step, 2 steps, nerve at its
    defaults (off)."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    config = as_nerve_config(llama3_debugmodel())
    config.model_spec = _cpu_model_spec(config.model_spec)
    config.tokenizer = VocabularyOnly.Config()
    config.dataloader = SyntheticDataLoader.Config()
    config.metrics = JsonlMetricsProcessor.Config(**config_values(config.metrics))
    config.metrics.log_freq = 1
    config.training.seq_len = 64
    config.training.local_batch_size = 4
    config.training.steps = 2
    config.checkpoint.enable = False
    config.validator.enable = False
    config.debug.seed = 0
    config.training.disable_cuda_graphs = True  # CPU; torchtitan refuses them with PP even where they would not run
    config.training.mixed_precision_param = "float32"  # fp32 compute: bf16 on CPUs is slow and blurs comparisons
    config.parallelism.spmd_backend = "partial_dtensor"  # the only one gloo runs for 2 ranks (NOTES.md)
    return config


def tiny_muon():
    """``tiny`` with nerve's Muon (float32 Newton-Schulz: bf16 matmuls crawl on CPUs)."""
    from nerve_plugin.torchtitan.muon import MuonSection
    from nerve_plugin.torchtitan.v0_3.muon import with_muon

    return with_muon(tiny(), MuonSection(ns_dtype="float32"))
