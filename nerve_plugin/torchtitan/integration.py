"""NerVE inside torchtitan 0.2.2's Trainer, through its extension points only.

``install()`` re-registers the TrainSpecs of torchtitan's models under their own names (a spec registered
under an existing name wins), so ``model.name`` stays as it was. The wrapped spec differs in four places, each
of which does nothing unless ``[nerve] enable = true``:

- ``parallelize_fn``: attaches the taps to the model (or to each pipeline stage) *before* torchtitan applies
  TP, activation checkpointing, compile and FSDP, so the hooks are part of what gets compiled.
- ``pipelining_fn``: under PP, counts only the schedule's microbatch forwards (not pipelining's shape
  inference).
- ``build_lr_schedulers_fn``: keeps the scheduler container. Its ``last_epoch`` counts finished optimizer
  steps and is restored from checkpoints, so ``last_epoch + 1`` is torchtitan's current step in every forward:
  under gradient accumulation, across pipeline microbatches, and after a resume.
- ``build_metrics_processor_fn``: the MetricsProcessor whose ``should_log(step)``, which the Trainer calls on
  every rank after every optimizer step, ends the step: on a logging step it merges, solves, and writes into
  torchtitan's own TensorBoard run and a JSONL file.

``build_optimizers_fn``: ``[optimizer] name = "Muon"`` builds nerve's Muon + AdamW (nerve_plugin/torchtitan/muon.py);
every other name builds as before.

Two data choices ride along, independent of NerVE: ``training.dataset = "python_stdlib"`` selects nerve's
offline corpus and vocabulary, and tiktoken-format tokenizer files are read by nerve's tokenizer.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn
from torchtitan.components.metrics import MetricsProcessor, TensorBoardLogger, build_metrics_processor
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec
from torchtitan.tools.logging import logger

from nerve_plugin.monitor import MonitorConfig, NerveMonitor, ParallelGroups
from nerve_plugin.records import LayerRecord, records_by_step
from nerve_plugin.taps import BUILTIN_SPECS
from nerve_plugin.torchtitan import muon, tensorboard_runs
from nerve_plugin.torchtitan.config import NerveConfigError
from nerve_plugin.torchtitan.corpus import build_corpus_dataloader
from nerve_plugin.torchtitan.tokenizer import build_tiktoken_tokenizer, find_tokenizer_file
from nerve_plugin.torchtitan.variants import SPEC_NAME as VARIANT_SPEC
from nerve_plugin.torchtitan.variants import get_train_spec as variant_train_spec
from nerve_plugin.shutdown import WriteOnStop, WritesOnce
from nerve_plugin.writers import JsonlWriter, NerveOutputError, TensorBoardWriter, open_jsonl, write_all

CORPUS_DATASET = "python_stdlib"  # training.dataset naming nerve's offline corpus (see corpus.py)


def nerve_config(job_config):
    """The [nerve] section, or None when the job was not built with nerve's custom_config_module."""
    return getattr(job_config, "nerve", None)


def enabled(job_config) -> bool:
    config = nerve_config(job_config)
    return bool(config is not None and config.enable)


class NerveSession:
    """Per-process state of one training job: the monitor, the step source and the writers."""

    def __init__(self, job_config, parallel_dims, model_name: str, model_args=None):
        self.job_config = job_config
        self.parallel_dims = parallel_dims
        self.config = nerve_config(job_config)
        spec_name = model_name if self.config.spec == "auto" else self.config.spec
        if spec_name not in BUILTIN_SPECS:
            raise ValueError(
                f"[nerve] spec = 'auto' has no tap spec for model.name = {model_name!r}: set [nerve] spec to "
                f"one of {sorted(BUILTIN_SPECS)} if its blocks have the same FFN layout, or turn [nerve] off"
            )
        self.spec = BUILTIN_SPECS[spec_name]
        depth = getattr(model_args, "n_layers", None)
        if depth is not None and any(layer >= depth for layer in self.config.layers):
            raise NerveConfigError(
                f"[nerve] layers = {self.config.layers} is not allowed: expected indices of the model's "
                f"{depth} blocks (0..{depth - 1}), or [] for all"
            )
        self.monitor_config = MonitorConfig(
            log_freq=self.config.log_freq,
            taps=tuple(self.config.taps),
            layers=self.config.layers or None,
            max_tokens_per_forward=self._tokens_per_forward(),
            solve_placement=self.config.solve_placement,
            seed=self.config.seed,
            solve_timing=self.config.solve_timing,
            max_layers_per_step=self.config.max_layers_per_step,
            model_layers=depth,
            solver_threads=self.config.solver_threads,
            max_overhead=self.config.max_overhead,
            eigensolver=self.config.eigensolver,
            on_error=self.config.on_error,
        )
        self.groups = ParallelGroups(
            token_group=_optional_group(parallel_dims, "loss"),
            feature_group=_optional_group(parallel_dims, "tp"),
            report_rank=_metrics_rank(parallel_dims, job_config),
        )
        self.monitor: NerveMonitor | None = None
        self.lr_schedulers = None
        self.writers: list | None = None  # built at the first write; writers that fail are dropped
        self.pipelined = False
        self.in_pipeline_chunk = 0
        self.first_step: int | None = None  # the first step this process trains (> 1 after a resume)
        self.processor: MetricsProcessor | None = None
        self._lock = None  # the JSONL's OutputLock, held by the reporting rank until close
        self._stop: WriteOnStop | None = None
        self._writes = WritesOnce(self._write_records)

    def start(self, metrics_processor: MetricsProcessor) -> None:
        """Start-up, before any step: the reporting rank checks and locks its JSONL (an unwritable path, or
        another run writing the folder, stops the run here, naming the path) and, with overlapped solves,
        writes what is solved when the job is stopped (SIGTERM/SIGINT; nerve_plugin.shutdown)."""
        self.processor = metrics_processor
        if torch.distributed.get_rank() != self.groups.report_rank:
            return
        if "jsonl" in self.config.outputs:
            self._lock = open_jsonl(jsonl_path(self.job_config))
        if self.config.solve_timing == "overlap":
            self._stop = WriteOnStop(self._ready_records, self._writes.write_on_stop).install()

    def close(self) -> None:
        """torchtitan's Trainer.close, also after an error: write what is solved (no collective: the other
        ranks may be gone), then let go of the signals and the lock."""
        try:
            if self._stop is not None:
                self._stop.write_ready(0.0, "close")
        finally:
            if self._stop is not None:
                self._stop.uninstall()
                self._stop = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _ready_records(self, wait_s: float) -> list[LayerRecord]:
        return self.monitor.ready_records(wait_s) if self.monitor is not None else []

    def _tokens_per_forward(self) -> int | None:
        budget = self.config.tokens_per_rank
        if budget == 0:
            return None
        training, parallelism = self.job_config.training, self.job_config.parallelism
        dp = self.parallel_dims.dp_replicate * self.parallel_dims.dp_shard
        global_batch = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * dp
        forwards = global_batch // (training.local_batch_size * dp)
        if self.parallel_dims.pp_enabled:
            forwards *= max(1, training.local_batch_size // parallelism.pipeline_parallel_microbatch_size)
        return max(2, budget // forwards)

    # -- hooks into the Trainer ------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        part = NerveMonitor(model, self.spec, self.monitor_config, self.groups)
        if self.monitor is None:
            self.monitor = part.attach()
        else:  # another pipeline stage held by this rank
            self.monitor.add_part(part)
        self._check_memory()
        model.register_forward_pre_hook(self._begin_forward)

    def _check_memory(self) -> None:
        """Stop at start-up, not with an out-of-memory error at the first logging step."""
        need = self.monitor.buffer_bytes()
        budget = self.config.memory_budget_gb * 2**30
        self.monitor.memory_budget_bytes = budget
        if need <= budget:
            return
        dims = sorted({d for t in self.monitor.taps for d in t.dims().values()})
        measured = len(self.monitor.selected_layers(1))
        # The float64 working copies do not shrink with fewer layers: ask the same estimate with fewer.
        fits = self.monitor.layers_that_fit(budget)
        hint = (
            f"set [nerve] max_layers_per_step = {fits} (layers rotate over logging steps)"
            if fits >= 1
            else ("measure one tap (taps), sub-sample fewer layers (layers)")
        )
        raise NerveConfigError(
            f"[nerve] memory_budget_gb = {self.config.memory_budget_gb} is too small: one logging step needs "
            f"{need / 2**30:.2f} GiB of covariance buffers on this rank ({measured} "
            f"layers x {len(self.config.taps)} taps at D = {dims}); {hint}, or raise memory_budget_gb"
        )

    def watch_pipeline(self, schedule) -> None:
        """Under PP, count only the schedule's microbatch forwards. torch.distributed.pipelining also runs each
        stage once at its first step to infer shapes, on a real microbatch at the first stage and on
        uninitialised tensors at the others; that forward must not reach the statistics."""
        self.pipelined = True
        stages = getattr(schedule, "_stages", None) or [schedule._stage]
        for stage in stages:
            stage.forward_one_chunk = self._counting_chunks(stage.forward_one_chunk)

    def _counting_chunks(self, forward_one_chunk):
        def wrapped(*args, **kwargs):
            self.in_pipeline_chunk += 1
            try:
                return forward_one_chunk(*args, **kwargs)
            finally:
                self.in_pipeline_chunk -= 1

        return wrapped

    def _begin_forward(self, module, args) -> None:
        # Evaluation forwards run without grad and must not count, nor must pipeline shape inference.
        if not torch.is_grad_enabled() or (self.pipelined and not self.in_pipeline_chunk):
            self.monitor.pause()
        elif self.lr_schedulers is not None:
            self.monitor.begin_step(self.lr_schedulers.schedulers[0].last_epoch + 1)

    def end_step(self, step: int, metrics_processor: MetricsProcessor) -> None:
        if self.monitor is None:
            return
        if self.first_step is None:
            self.first_step = step
            if step > 1:
                self._continue_tensorboard_run(step, metrics_processor)
        records = self.monitor.end_step(step)
        if self._flush_due(step):
            # Overlapped solves still running must land before a checkpoint: a resume from it starts after
            # this step and would never see them.
            records = (records or []) + self.monitor.flush()
        if records is None or torch.distributed.get_rank() != self.groups.report_rank:
            return
        self._writes.write(records)

    def _continue_tensorboard_run(self, step: int, metrics_processor: MetricsProcessor) -> None:
        """A resumed process: its TensorBoard logger goes on in the interrupted attempt's run, with the restart
        marker that hides that run's stale points (tensorboard_runs.py). Here, at the first step's should_log,
        torchtitan has not logged a point of this process yet; a marker after one would hide it too."""
        tb = [x for x in getattr(metrics_processor.logger, "_loggers", []) if isinstance(x, TensorBoardLogger)]
        if "tensorboard" not in self.config.outputs or not tb:
            return
        root = os.path.join(self.job_config.job.dump_folder, self.job_config.metrics.save_tb_folder)
        try:
            previous = tensorboard_runs.continue_run(tb[0], root, step)
        except Exception as error:  # TensorBoard's bookkeeping must not stop training
            logger.error(
                f"nerve: resumed at step {step}, but continuing the earlier TensorBoard run failed "
                f"({type(error).__name__}: {error}); its points from step {step} on stay visible"
            )
            return
        if previous is not None:
            logger.info(
                f"nerve: resumed at step {step}: TensorBoard goes on in the interrupted attempt's run "
                f"{previous}, whose points from step {step} on are hidden by a restart marker"
            )

    def _flush_due(self, step: int) -> bool:
        checkpoint = self.job_config.checkpoint
        if step >= self.job_config.training.steps:
            return True
        return bool(checkpoint.enable and checkpoint.interval > 0 and step % checkpoint.interval == 0)

    def _write_records(self, records: list[LayerRecord]) -> None:
        for step, step_records in records_by_step(records).items():
            self._write(step, step_records)

    def _write(self, step: int, records: list[LayerRecord]) -> None:
        if self.writers is None:
            self.writers = self._build_writers(self.processor)
        self.writers = write_all(self.writers, step, records, self.config.on_error)
        pre = [r.pre.spectral_entropy for r in records if r.pre]
        post = [r.post.spectral_entropy for r in records if r.post]
        summary = f"nerve step {step}: {len(records)} layers, merge {self.monitor.last_duration_s:.2f}s"
        if pre and post:
            summary += f", mean SE pre {sum(pre) / len(pre):.3f} -> post {sum(post) / len(post):.3f}"
        logger.info(summary)

    def _build_writers(self, metrics_processor: MetricsProcessor) -> list:
        writers = []
        if "tensorboard" in self.config.outputs:
            tb = [x for x in getattr(metrics_processor.logger, "_loggers", []) if isinstance(x, TensorBoardLogger)]
            if tb:
                writers.append(TensorBoardWriter(tb[0].writer, self.config.taps))
            else:
                logger.warning("[nerve] outputs has 'tensorboard' but metrics.enable_tensorboard is off on this rank")
        if "jsonl" in self.config.outputs:
            writers.append(JsonlWriter(jsonl_path(self.job_config)))
        usable = []
        for writer in writers:
            try:
                if self.first_step is not None and self.first_step > 1 and isinstance(writer, JsonlWriter):
                    # A resumed run: what an earlier attempt logged from here on is stale and is logged again.
                    # (TensorBoard got its marker at the first step: here, after torchtitan's first points of
                    # this process, it would hide them too.)
                    writer.truncate_from(self.first_step)
                elif self.first_step == 1 and isinstance(writer, JsonlWriter):
                    # A fresh run: records already there belong to an attempt this run does not continue.
                    writer.start_fresh()
                usable.append(writer)
            except OSError as error:
                if self.config.on_error == "raise":
                    raise NerveOutputError(
                        f"nerve: preparing {getattr(writer, 'path', writer)} failed ({error}); "
                        f"[nerve] on_error = 'raise' stops the run"
                    ) from error
                logger.error(
                    f"nerve: preparing {getattr(writer, 'path', writer)} failed ({error}); nerve does not "
                    f"write there, training goes on"
                )
        return usable


def jsonl_path(job_config) -> str:
    return os.path.join(job_config.job.dump_folder, "nerve", "metrics.jsonl")


# The job's NerveSession lives on the objects torchtitan hands the builders: the JobConfig (metrics processor,
# parallelize, pipelining) and the model parts it parallelized (the LR scheduler builder gets only the optimizers,
# which hold them). No module global: two Trainers in one process (tests, notebooks) keep their sessions apart.
SESSION_ATTRIBUTE = "_nerve_session"


def session_of(job_config) -> NerveSession | None:
    """The NerVE session of the job ``job_config`` configures (None before its metrics processor is built, or
    with NerVE off)."""
    return getattr(job_config, SESSION_ATTRIBUTE, None)


def _session_of_parts(model_parts) -> NerveSession | None:
    return next((s for part in model_parts if (s := getattr(part, SESSION_ATTRIBUTE, None)) is not None), None)


def wrap_train_spec(spec: TrainSpec, model_name: str) -> TrainSpec:
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
        session = NerveSession(job_config, parallel_dims, model_name, model_args)
        setattr(job_config, SESSION_ATTRIBUTE, session)
        session.start(processor)
        torchtitan_should_log = processor.should_log
        torchtitan_close = processor.close

        def close() -> None:
            try:
                session.close()
            finally:
                torchtitan_close()

        processor.close = close

        def should_log(step: int) -> bool:
            # The Trainer calls this on every rank once per step, after the optimizer step: the one place
            # where every rank can issue the merge's collectives at the same step.
            session.end_step(step, processor)
            return torchtitan_should_log(step)

        processor.should_log = should_log
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
        session = _session_of_parts(getattr(optimizers, "model_parts", ()))
        if session is not None:
            session.lr_schedulers = schedulers
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

    return muon.wrap_train_spec(
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


def _optional_group(parallel_dims, name: str):
    """The process group of a mesh dimension, or None when that parallelism is off. (A degree-1 dimension can
    still hand out a group spanning other ranks, so the degree decides, and the group must match it.)"""
    degree = {"loss": parallel_dims.dp_replicate * parallel_dims.dp_shard * parallel_dims.cp, "tp": parallel_dims.tp}[
        name
    ]
    if degree == 1:
        return None
    group = parallel_dims.get_mesh(name).get_group()
    if torch.distributed.get_world_size(group) != degree:
        raise RuntimeError(
            f"nerve: mesh {name!r} has a group of {torch.distributed.get_world_size(group)} ranks, expected {degree}"
        )
    return group


def _metrics_rank(parallel_dims, job_config) -> int:
    # The rank whose TensorBoard run holds the loss: torchtitan logs from the first rank of the last pipeline
    # stage, or rank 0 (also for the ZBVZeroBubble schedule, which returns the loss on rank 0).
    if not parallel_dims.pp_enabled or job_config.parallelism.pipeline_parallel_schedule == "ZBVZeroBubble":
        return 0
    return (parallel_dims.world_size // parallel_dims.pp) * (parallel_dims.pp - 1)
