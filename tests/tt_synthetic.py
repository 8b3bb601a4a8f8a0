"""Test-only torchtitan custom import: CPU mode plus a synthetic llama3 train spec.

Use with `--experimental.custom_import tt_synthetic --model.name nerve_test_llama3`
(tests/ must be on PYTHONPATH). torchtitan's wheel ships no tokenizer and no data, so
the spec `nerve_test_llama3` is llama3's TrainSpec with:
  - no tokenizer (the Trainer accepts None; sdpa attention, the flavors without
    "flex"/"varlen" in their name, needs none),
  - a synthetic dataloader: sample i of the global stream is `seq_len + 1` token ids
    drawn from a generator seeded with (DATA_SEED + i); dp rank r of W takes samples
    r, r + W, r + 2W, ... So any dp degree sees the same global batches (as sets), and
    a 1-process run with local_batch_size B*W is comparable with a W-rank run with B.
  - a model whose init_weights gives the same weights whatever the parallelism (on CPU,
    DTensor random init draws each shard from the rank's local generator, so FSDP/TP
    runs would otherwise start from other weights than a 1-process run),
  - a metrics processor that also appends each logged step's exact loss and grad norm
    to `<dump_folder>/metrics_rank<R>.jsonl` (torchtitan's log line rounds them).
"""

import json
import os
from dataclasses import asdict, replace

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from nerve_plugin.taps import canonical_name
from synthetic_tokens import DATA_SEED, VOCAB, SyntheticTokens  # noqa: F401  (DATA_SEED, VOCAB: for tests)
from nerve_plugin.torchtitan.cpu_mode import enable_cpu_mode

enable_cpu_mode()

from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.metrics import MetricsProcessor  # noqa: E402
from torchtitan.models.llama3 import Transformer, get_train_spec  # noqa: E402
from torchtitan.protocols import train_spec as train_spec_module  # noqa: E402

SPEC_NAME = "nerve_test_llama3"
INIT_SEED = 42


def build_synthetic_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **_):
    ds = SyntheticTokens(job_config.training.seq_len, dp_rank, dp_world_size)
    kwargs = {**asdict(job_config.training.dataloader), "batch_size": job_config.training.local_batch_size}
    return ParallelAwareDataloader(ds, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)


class SeededTransformer(Transformer):
    """llama3 Transformer whose parameters start as those of an unsharded model
    initialized from INIT_SEED; each rank keeps its own shard (FSDP/TP) or stage (PP)."""

    @torch.no_grad()
    def init_weights(self, buffer_device=None):
        super().init_weights(buffer_device=buffer_device)  # buffers (RoPE table)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(INIT_SEED)
            ref = Transformer(self.model_args)
            ref.init_weights()
        full = dict(ref.named_parameters())
        for name, p in self.named_parameters():
            # wrappers (activation checkpointing, compile) add name components
            w = full[canonical_name(name)]
            if isinstance(p, DTensor):  # keep this rank's slice, no communication
                p.to_local().copy_(distribute_tensor(w, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(w)


class JsonlMetricsProcessor(MetricsProcessor):
    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = os.path.join(self.job_config.job.dump_folder, f"metrics_rank{rank}.jsonl")
        loss, max_loss = (float(v) for v in (global_avg_loss, global_max_loss))
        with open(path, "a") as f:
            f.write(
                json.dumps({"step": step, "loss": loss, "max_loss": max_loss, "grad_norm": float(grad_norm)}) + "\n"
            )


def build_jsonl_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return JsonlMetricsProcessor(job_config, parallel_dims, tag)


try:
    train_spec_module.register_train_spec(
        SPEC_NAME,
        replace(
            get_train_spec(),
            model_cls=SeededTransformer,
            build_tokenizer_fn=None,
            build_dataloader_fn=build_synthetic_dataloader,
            build_metrics_processor_fn=build_jsonl_metrics_processor,
        ),
    )
except ValueError:  # already registered (this module was imported before)
    pass
