"""torchtitan 0.2.2's TrainSpec "nerve_llama": its llama3 spec with the variant model (../variants/model.py).

- ``model_cls``: ``VariantTransformer``; ``model_args``: torchtitan's llama3 flavors (as ``VariantArgs``, with
  llama3's choices, so that with no [variant] key set the model is llama3's), plus GPT-2-style flavors
  (layernorm, gelu, learned absolute positions, FFN hidden = 4 x dim, GPT-2's initialisation: every weight
  N(0, 0.02), the residual output projections 0.02 / sqrt(2 n_layers), see model.py; no linear biases, untied
  embeddings: torchtitan's llama3 skeleton otherwise) ``gpt2_debugmodel`` (llama3 debugmodel's sizes), ``gpt2_mini``
  (dim 384, 8 blocks of 6 heads, nerve's 2048-token vocabulary: ~16M parameters, the size of the experiment
  configs in train_configs/), ``gpt2_small`` (124M sizes), ``gpt2_medium``, ``gpt2_large``, ``gpt2_xl``.
- ``parallelize_fn``: llama3's, after checking that the variant is supported under the job's parallelism;
  otherwise the run stops at start-up naming the key and the parallelism.
- ``build_optimizers_fn``: llama3's, then the variant's optimizer rules: (a) the variant's gains
  (``weight_gain``, ``leaky_slope``) move to a param group with weight_decay = 0, (b) with ffn_geometry =
  hyperspherical/ngpt a step post-hook re-projects the FFN weight rows to unit norm after every optimizer step.
- ``build_lr_schedulers_fn``: llama3's, after applying the same rules to a container that an outer builder made
  (nerve's Muon replaces the whole optimizer builder for ``[optimizer] name = "Muon"``, so ours never runs
  there). torchtitan's Trainer builds the schedulers right after the optimizers, before any step, and the
  schedulers must see the final param groups. The rules run once per container.
"""

from __future__ import annotations

import dataclasses

from torchtitan.models.llama3 import get_train_spec as llama3_train_spec
from torchtitan.models.llama3 import llama3_args
from torchtitan.protocols.train_spec import TrainSpec

from nerve_plugin.torchtitan.variants.model import (
    VariantArgs,
    VariantTransformer,
    hyperspherical_linears,
    no_weight_decay,
    project_hyperspherical,
)


_GPT2 = dict(activation="gelu", norm="layernorm", pos_encoding="learned", ffn_multiplier=4.0, weight_init="gpt2")
GPT2_FLAVORS = {
    "gpt2_debugmodel": dict(dim=256, n_layers=6, n_heads=16, vocab_size=2048, max_seq_len=1024),
    "gpt2_mini": dict(dim=384, n_layers=8, n_heads=6, vocab_size=2048, max_seq_len=1024),
    "gpt2_small": dict(dim=768, n_layers=12, n_heads=12, vocab_size=50257, max_seq_len=1024),
    "gpt2_medium": dict(dim=1024, n_layers=24, n_heads=16, vocab_size=50257, max_seq_len=1024),
    "gpt2_large": dict(dim=1280, n_layers=36, n_heads=20, vocab_size=50257, max_seq_len=1024),
    "gpt2_xl": dict(dim=1600, n_layers=48, n_heads=25, vocab_size=50257, max_seq_len=1024),
}


def variant_flavors() -> dict[str, VariantArgs]:
    flavors = {name: VariantArgs.from_llama3(args) for name, args in llama3_args.items()}
    flavors.update({name: VariantArgs(**sizes, **_GPT2) for name, sizes in GPT2_FLAVORS.items()})
    return flavors


class VariantParallelismError(ValueError):
    pass


def check_parallelism(args: VariantArgs, parallel_dims, job_config) -> None:
    """Refuse, at start-up, the variant options that the job's parallelism cannot run."""

    def refuse(key: str, parallelism: str, why: str):
        raise VariantParallelismError(
            f"[variant] {key} = {getattr(args, key)!r} is not supported with {parallelism}: {why}"
        )

    compiled = job_config.compile.enable and "model" in job_config.compile.components
    if parallel_dims.tp_enabled:
        if not args.gated:
            refuse(
                "activation",
                "tensor parallelism",
                "llama3's TP plan shards feed_forward.w3, which non-gated FFNs do not have; use swiglu or geglu",
            )
        if args.ffn_geometry != "none":
            refuse(
                "ffn_geometry",
                "tensor parallelism",
                "the gains, power-iteration vectors and row norms assume whole weight rows on each rank",
            )
        if args.pos_encoding == "learned":
            refuse(
                "pos_encoding",
                "tensor parallelism",
                "the token embeddings come out sequence-sharded; learned positions are not sharded to match",
            )
        if args.norm_placement != "pre":
            refuse("norm_placement", "tensor parallelism", "only pre-norm blocks follow llama3's TP plan (untested)")
    if parallel_dims.cp_enabled and args.pos_encoding == "learned":
        refuse("pos_encoding", "context parallelism", "each rank holds a shard of the sequence, not positions 0..n")
    if parallel_dims.pp_enabled:
        if args.pos_encoding == "learned":
            refuse(
                "pos_encoding",
                "pipeline parallelism",
                "torchtitan's pipeline split keeps only tok_embeddings on the first stage; pos_embeddings "
                "would be on every stage",
            )
        if args.activation == "learnable_leaky_relu" and args.learnable_slope == "global":
            refuse(
                "learnable_slope",
                "pipeline parallelism",
                "one slope shared by blocks on different stages; use learnable_slope = 'layer'",
            )
    if compiled:
        if args.ffn_geometry == "spectral_norm":
            refuse("ffn_geometry", "torch.compile", "the in-forward power-iteration update is not compile-tested")
        if args.activation == "learnable_leaky_relu" and args.learnable_slope == "global":
            refuse("learnable_slope", "torch.compile", "the per-block graphs would read a parameter of the model root")


def parallelize_variant(parallelize_fn):
    def parallelize(model, parallel_dims, job_config, *args, **kwargs):
        if isinstance(model.model_args, VariantArgs):
            check_parallelism(model.model_args, parallel_dims, job_config)
        return parallelize_fn(model, parallel_dims, job_config, *args, **kwargs)

    return parallelize


def split_weight_decay(optimizers, model_parts) -> int:
    """Move the variant gains out of every param group that decays them, into a copy of that group with
    weight_decay = 0 (AdamW's groups, and the AdamW groups of Muon); returns how many moved."""
    moved = 0
    for optimizer, part in zip(optimizers, model_parts):
        names = set(no_weight_decay(part))
        exempt = {id(p) for n, p in part.named_parameters() if n in names}
        if not exempt:
            continue
        for group in list(optimizer.param_groups):
            gains = [p for p in group["params"] if id(p) in exempt]
            if not gains or group.get("weight_decay", 0) == 0:
                continue
            keep = [p for p in group["params"] if id(p) not in exempt]
            if not keep:  # nothing else in the group: no new group needed
                group["weight_decay"] = 0.0
            else:
                group["params"] = keep
                optimizer.add_param_group(
                    {**{k: v for k, v in group.items() if k != "params"}, "params": gains, "weight_decay": 0.0}
                )
            moved += len(gains)
    return moved


def apply_variant_rules(optimizers) -> None:
    """Weight-decay exemption of the gains and hyperspherical re-projection, once per optimizers container."""
    if getattr(optimizers, "_nerve_variant_rules", False):
        return
    optimizers._nerve_variant_rules = True
    model_parts = optimizers.model_parts
    inner = list(getattr(optimizers, "optimizers", [optimizers]))
    if len(inner) == len(model_parts):
        split_weight_decay(inner, model_parts)
    if any(hyperspherical_linears(part) for part in model_parts):
        optimizers.register_step_post_hook(lambda *a, **k: project_hyperspherical(model_parts))


def build_variant_optimizers(build_optimizers_fn):
    def build(model_parts, optimizer_config, parallel_dims, *args, **kwargs):
        optimizers = build_optimizers_fn(model_parts, optimizer_config, parallel_dims, *args, **kwargs)
        apply_variant_rules(optimizers)
        return optimizers

    return build


def build_variant_lr_schedulers(build_lr_schedulers_fn):
    def build(optimizers, *args, **kwargs):
        apply_variant_rules(optimizers)  # a no-op when our optimizer builder made the container
        return build_lr_schedulers_fn(optimizers, *args, **kwargs)

    return build


def get_train_spec() -> TrainSpec:
    base = llama3_train_spec()
    return dataclasses.replace(
        base,
        model_cls=VariantTransformer,
        model_args=variant_flavors(),
        parallelize_fn=parallelize_variant(base.parallelize_fn),
        build_optimizers_fn=build_variant_optimizers(base.build_optimizers_fn),
        build_lr_schedulers_fn=build_variant_lr_schedulers(base.build_lr_schedulers_fn),
    )
