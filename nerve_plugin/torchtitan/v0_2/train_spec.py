"""NerVE inside torchtitan 0.2.2's Trainer, through its TrainSpec builders only.

``install()`` re-registers the TrainSpecs of torchtitan's models under their own names (a spec registered
under an existing name wins), so ``model.name`` stays as it was. The wrapped spec starts the job's NerveSession
(session.py, version-neutral) and hands it what it needs, each doing nothing unless ``[nerve] enable = true``:

- ``build_metrics_processor_fn``: the session, from the JobConfig (``job_facts``) and the parallel dims, started
  beside torchtitan's MetricsProcessor (whose TensorBoard run nerve writes into), closed with it;
- ``parallelize_fn``: the taps attached to the model (or to each pipeline stage) before torchtitan's own
  parallelisms; ``pipelining_fn``: under PP, only the schedule's microbatch forwards count;
- ``build_lr_schedulers_fn``: the scheduler container (the step source), and the end of a step registered as a
  post-hook of the optimizers container.

``build_optimizers_fn``: ``[optimizer] name = "Muon"`` builds nerve's Muon + AdamW (../muon.py); every other name
builds as before.

Two data choices ride along, independent of NerVE: ``training.dataset = "python_stdlib"`` selects nerve's
offline corpus and vocabulary, and tiktoken-format tokenizer files are read by nerve's tokenizer.
"""

from __future__ import annotations

import dataclasses
import os

import torchtitan.components.optimizer as tt_optimizer
from torchtitan.components.metrics import build_metrics_processor
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec

from nerve_plugin.torchtitan.corpus import build_corpus_dataloader
from nerve_plugin.torchtitan.muon import OPTIMIZER_NAME, build_muon_optimizers, muon_config
from nerve_plugin.torchtitan.session import (
    SESSION_ATTRIBUTE,
    NerveSession,
    job_facts,
    process_groups,
    session_of,
    session_of_parts,
    tap_spec,
)
from nerve_plugin.torchtitan.tokenizer import build_tiktoken_tokenizer, find_tokenizer_file
from nerve_plugin.variants import SPEC_NAME as VARIANT_SPEC
from nerve_plugin.torchtitan.v0_2.variant_spec import get_train_spec as variant_train_spec

CORPUS_DATASET = "python_stdlib"  # training.dataset naming nerve's offline corpus (see corpus.py)


def nerve_config(job_config):
    """The [nerve] section, or None when the job was not built with nerve's custom_config_module."""
    return getattr(job_config, "nerve", None)


def enabled(job_config) -> bool:
    config = nerve_config(job_config)
    return bool(config is not None and config.enable)


def new_session(job_config, parallel_dims, model_name: str, model_args=None) -> NerveSession:
    """The session of a 0.2.2 job: its [nerve] section, its facts, its process groups."""
    config = nerve_config(job_config)
    spec = tap_spec(config, model_name)  # first: a model without taps is refused before anything else
    facts = job_facts(
        job_config.job.dump_folder,
        job_config.training,
        job_config.parallelism,
        job_config.checkpoint,
        job_config.metrics,
        parallel_dims,
    )
    groups = process_groups(parallel_dims, job_config.parallelism.pipeline_parallel_schedule)
    return NerveSession(config, facts, groups, spec, getattr(model_args, "n_layers", None))


WRAPPED = "_nerve_wrapped"  # marks the builders of a spec nerve wrapped


def wrap_train_spec(spec: TrainSpec, model_name: str) -> TrainSpec:
    """``spec`` with NerVE, Muon and nerve's data choices (module docstring); a spec nerve wrapped already
    comes back as it is (a patched fork's Trainer wraps whatever spec it gets)."""
    if getattr(spec.build_metrics_processor_fn, WRAPPED, False):
        return spec
    original_parallelize = spec.parallelize_fn
    original_lr_schedulers = spec.build_lr_schedulers_fn
    original_pipelining = spec.pipelining_fn
    original_tokenizer = spec.build_tokenizer_fn
    original_dataloader = spec.build_dataloader_fn
    original_metrics = spec.build_metrics_processor_fn or build_metrics_processor

    def build_metrics_processor_fn(job_config, parallel_dims, model_args=None, *args, **kwargs):
        if not enabled(job_config):
            return original_metrics(job_config, parallel_dims, model_args, *args, **kwargs)
        processor = original_metrics(job_config, parallel_dims, model_args, *args, **kwargs)
        session = new_session(job_config, parallel_dims, model_name, model_args)
        setattr(job_config, SESSION_ATTRIBUTE, session)
        session.start(processor)
        torchtitan_close = processor.close

        def close() -> None:
            try:
                session.close()
            finally:
                torchtitan_close()

        processor.close = close
        return processor

    def parallelize_fn(model, parallel_dims, job_config, *args, **kwargs):
        session = session_of(job_config)
        if enabled(job_config) and session is not None:
            session.attach(model)
            setattr(model, SESSION_ATTRIBUTE, session)  # for the LR scheduler builder, which gets only the optimizers
        return original_parallelize(model, parallel_dims, job_config, *args, **kwargs)

    def pipelining_fn(model, parallel_dims, job_config, *args, **kwargs):
        schedule, model_parts, has_first_stage, has_last_stage = original_pipelining(
            model, parallel_dims, job_config, *args, **kwargs
        )
        session = session_of(job_config)
        if enabled(job_config) and session is not None and session.monitor is not None:
            session.watch_pipeline(schedule)
        return schedule, model_parts, has_first_stage, has_last_stage

    def build_lr_schedulers_fn(optimizers, lr_config, training_steps, *args, **kwargs):
        schedulers = original_lr_schedulers(optimizers, lr_config, training_steps, *args, **kwargs)
        session = session_of_parts(getattr(optimizers, "model_parts", ()))
        if session is not None:
            # last_epoch counts finished optimizer steps (restored from checkpoints): + 1 is the step running,
            # also in the optimizer step's post-hook, which runs before the LR step
            session.current_step = lambda: schedulers.schedulers[0].last_epoch + 1
            optimizers.register_step_post_hook(session.after_optimizer_step)
        return schedulers

    def build_tokenizer_fn(job_config):
        if uses_tiktoken_assets(job_config):
            return build_tiktoken_tokenizer(job_config)
        if original_tokenizer is build_hf_tokenizer:
            check_tokenizer_path(job_config)
        return original_tokenizer(job_config) if original_tokenizer is not None else None

    def build_dataloader_fn(dp_world_size, dp_rank, tokenizer, job_config, *args, **kwargs):
        if job_config.training.dataset == CORPUS_DATASET:
            return build_corpus_dataloader(dp_world_size, dp_rank, tokenizer, job_config)
        if original_dataloader is build_text_dataloader:
            check_dataset_path(job_config)
        return original_dataloader(dp_world_size, dp_rank, tokenizer, job_config, *args, **kwargs)

    build_metrics_processor_fn.__dict__[WRAPPED] = True
    return wrap_muon(
        dataclasses.replace(
            spec,
            build_tokenizer_fn=build_tokenizer_fn,
            build_dataloader_fn=build_dataloader_fn,
            parallelize_fn=parallelize_fn,
            pipelining_fn=pipelining_fn if original_pipelining is not None else None,
            build_lr_schedulers_fn=build_lr_schedulers_fn,
            build_metrics_processor_fn=build_metrics_processor_fn,
        )
    )


def install() -> None:
    """Register the wrapped spec of every torchtitan model (idempotent). Models without a tap spec are wrapped
    too, so that ``[nerve] enable = true`` on them stops at start-up with a clear error rather than measuring
    nothing."""
    from torchtitan.models import _supported_models

    for name in sorted(_supported_models - _installed):
        try:
            spec = get_train_spec(name)
        except ImportError:  # a model whose optional dependencies are missing (flux needs transformers)
            continue
        register_train_spec(name, wrap_train_spec(spec, name))
        _installed.add(name)
    if VARIANT_SPEC not in _installed:  # nerve's own model family, for the paper's variants
        register_train_spec(VARIANT_SPEC, wrap_train_spec(variant_train_spec(), VARIANT_SPEC))
        _installed.add(VARIANT_SPEC)


_installed: set[str] = set()


def uses_tiktoken_assets(job_config) -> bool:
    """nerve's offline corpus comes with nerve's vocabulary; a tiktoken file (a Llama-3 ``tokenizer.model``,
    a ``*.tiktoken``) without a ``tokenizer.json`` beside it is read by nerve's tiktoken tokenizer. Everything
    else goes to torchtitan's own HuggingFace tokenizer, as before."""
    if job_config.training.dataset == CORPUS_DATASET:
        return True
    path = job_config.model.hf_assets_path
    has_tokenizer_json = os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json"))
    return find_tokenizer_file(path) is not None and not has_tokenizer_json


# torchtitan's datasets whose default path is a folder of its source tree (tests/assets/...), not a Hub name.
LOCAL_DATASETS = ("c4_test",)
OFFLINE_HINT = (
    f'or train offline on nerve\'s corpus and vocabulary: training.dataset = "{CORPUS_DATASET}" '
    f'(--training.dataset {CORPUS_DATASET}; README, "Data and tokenizer")'
)


def check_tokenizer_path(job_config) -> None:
    """torchtitan's HF tokenizer needs model.hf_assets_path to exist; without it torchtitan's message speaks of
    downloading (its debug configs name ./tests/assets/tokenizer, which its wheel does not ship)."""
    path = job_config.model.hf_assets_path
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model.hf_assets_path = {path!r} does not exist: set it to a folder holding the tokenizer "
            f"(tokenizer.json, or a tiktoken tokenizer.model), {OFFLINE_HINT}"
        )


def check_dataset_path(job_config) -> None:
    """torchtitan's text datasets read a local folder for c4_test (its source tree's, not in its wheel) or for a
    training.dataset_path that is a path; a missing one would otherwise be looked up on the Hugging Face Hub."""
    from torchtitan.hf_datasets.text_datasets import DATASETS

    training = job_config.training
    if training.dataset_path:
        path, what = training.dataset_path, f"training.dataset_path = {training.dataset_path!r}"
        local = path.startswith(("/", ".", "~"))  # a Hub name ("allenai/c4") never starts so
    elif training.dataset in DATASETS:
        path = DATASETS[training.dataset].path
        what = f"training.dataset = {training.dataset!r} reads {path!r}, which"
        local = training.dataset in LOCAL_DATASETS
    else:
        return  # an unknown name: torchtitan's own error lists the datasets it has
    if local and not os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"{what} does not exist (relative to {os.getcwd()}): set training.dataset_path to the dataset's "
            f"folder, {OFFLINE_HINT}"
        )


# The job's JobConfig, put on each model part by the wrapped parallelize_fn (the Trainer calls it before building
# optimizers, which get only the model parts): per job, not a module global.
JOB_CONFIG_ATTRIBUTE = "_nerve_job_config"


def wrap_muon(spec: TrainSpec) -> TrainSpec:
    """``spec`` with ``[optimizer] name = "Muon"`` available; every other optimizer name builds as before.

    torchtitan hands an optimizer builder only ``job_config.optimizer``; the ``[muon]`` section comes from the
    JobConfig that ``parallelize_fn`` receives and puts on each model part (the Trainer calls it before building
    optimizers, also under PP, where pipelining calls it per stage).
    """
    original_parallelize = spec.parallelize_fn
    original_optimizers = spec.build_optimizers_fn

    def parallelize_fn(model, parallel_dims, job_config, *args, **kwargs):
        setattr(model, JOB_CONFIG_ATTRIBUTE, job_config)
        return original_parallelize(model, parallel_dims, job_config, *args, **kwargs)

    def build_optimizers_fn(model_parts, optimizer_config, parallel_dims, ft_manager=None, *args, **kwargs):
        if optimizer_config.name != OPTIMIZER_NAME:
            return original_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager, *args, **kwargs)
        job_config = next(
            (c for part in model_parts if (c := getattr(part, JOB_CONFIG_ATTRIBUTE, None)) is not None), None
        )
        container = build_muon_optimizers(
            model_parts, optimizer_config, parallel_dims, ft_manager, muon_config(job_config)
        )
        if original_optimizers is tt_optimizer.build_optimizers_with_moe_load_balancing:
            return _with_moe_load_balancing(container, model_parts, optimizer_config, parallel_dims, ft_manager)
        return container

    return dataclasses.replace(spec, parallelize_fn=parallelize_fn, build_optimizers_fn=build_optimizers_fn)


def _with_moe_load_balancing(container, model_parts, optimizer_config, parallel_dims, ft_manager):
    """MoE specs (llama4, deepseek_v3) build their optimizers with torchtitan's build_optimizers plus a step
    pre-hook that updates the experts' load-balancing biases. That builder calls build_optimizers by its module
    name: pointing the name at our container for the call keeps torchtitan's hook exactly as it is. (A private
    seam: 0.2.2 has no way to hand that builder another container.)"""
    original = tt_optimizer.build_optimizers
    tt_optimizer.build_optimizers = lambda *args, **kwargs: container
    try:
        return tt_optimizer.build_optimizers_with_moe_load_balancing(
            model_parts, optimizer_config, parallel_dims, ft_manager
        )
    finally:
        tt_optimizer.build_optimizers = original
