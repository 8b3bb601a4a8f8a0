"""One training job's NerVE, version-neutral: the session every torchtitan adapter (v0_2/, ...) starts.

A ``NerveSession`` holds the monitor, the step source (torchtitan's LR scheduler), the writers and the stop
handlers of one job. The adapter builds it from its version's config (``JobFacts``: what the session must know of
the job) and calls it from its version's seams:

- ``attach(model)`` before torchtitan applies TP, activation checkpointing, compile and FSDP, so the hooks are
  part of what gets compiled (``watch_pipeline(schedule)`` under PP);
- ``after_optimizer_step`` as a step post-hook of torchtitan's optimizers container
  (``register_step_post_hook``, torch's public Optimizer hook, which torchtitan's containers keep for MoE load
  balancing): every rank runs it once per step, right after the optimizer step and before the LR step, the
  checkpoint and torchtitan's own metric log; on a logging step it merges, solves, and writes into torchtitan's
  own TensorBoard run and a JSONL file;
- ``start(metrics_processor)`` before the first step and ``close()`` with torchtitan's metrics processor.

The current step comes from the adapter (``current_step``): in 0.2.2 torchtitan's LR scheduler's ``last_epoch +
1`` (it counts finished optimizer steps and is restored from checkpoints, so it is right in every forward under
gradient accumulation, across pipeline microbatches, after a resume, and in the post-hook, which runs before the
LR step); in 0.3.0 the Trainer's own ``step``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from torch import nn
from torchtitan.components.metrics import MetricsProcessor, TensorBoardLogger
from torchtitan.tools.logging import logger

from nerve_plugin.monitor import MonitorConfig, NerveMonitor, ParallelGroups
from nerve_plugin.records import LayerRecord, records_by_step
from nerve_plugin.shutdown import WriteOnStop, WritesOnce
from nerve_plugin.solve import DEFERRED_TIMINGS
from nerve_plugin.taps import BUILTIN_SPECS, TapSpec
from nerve_plugin.torchtitan import tensorboard_runs
from nerve_plugin.torchtitan.sections import NerveConfigError
from nerve_plugin.writers import build_writers, open_jsonl, write_all


@dataclasses.dataclass(frozen=True)
class JobFacts:
    """What a NerveSession must know of its job, read by each torchtitan version's adapter from its config."""

    dump_folder: str
    tensorboard_root: str  # where torchtitan puts its TensorBoard runs (<dump_folder>/<metrics.save_tb_folder>)
    steps: int  # training.steps: the last step flushes overlapped solves
    checkpoint_interval: int  # steps between checkpoints (overlapped solves land before each); 0: none
    forwards_per_step: int = 1  # model forwards per optimizer step on a rank (accumulation x PP microbatches)

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.dump_folder, "nerve", "metrics.jsonl")


def job_facts(dump_folder: str, training, parallelism, checkpoint, metrics, parallel_dims) -> JobFacts:
    """The facts from torchtitan's config sections, whose keys 0.2.2 and 0.3.0 share (training, parallelism,
    checkpoint, metrics); only where the dump folder sits differs."""
    dp = parallel_dims.dp_replicate * parallel_dims.dp_shard
    global_batch = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * dp
    forwards = max(1, global_batch // (training.local_batch_size * dp))
    if parallel_dims.pp_enabled:
        forwards *= max(1, training.local_batch_size // parallelism.pipeline_parallel_microbatch_size)
    return JobFacts(
        dump_folder=dump_folder,
        tensorboard_root=os.path.join(dump_folder, metrics.save_tb_folder),
        steps=training.steps,
        checkpoint_interval=checkpoint.interval if checkpoint.enable else 0,
        forwards_per_step=forwards,
    )


def process_groups(parallel_dims, pipeline_schedule: str) -> ParallelGroups:
    """Which ranks share tokens (data parallel and CP), which share features (TP), and which rank reports."""
    return ParallelGroups(
        token_group=_optional_group(parallel_dims, "loss"),
        feature_group=_optional_group(parallel_dims, "tp"),
        report_rank=_metrics_rank(parallel_dims, pipeline_schedule),
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


def _metrics_rank(parallel_dims, pipeline_schedule: str) -> int:
    # The rank whose TensorBoard run holds the loss: torchtitan logs from the first rank of the last pipeline
    # stage, or rank 0 (also for the ZBVZeroBubble schedule, which returns the loss on rank 0).
    if not parallel_dims.pp_enabled or pipeline_schedule == "ZBVZeroBubble":
        return 0
    return (parallel_dims.world_size // parallel_dims.pp) * (parallel_dims.pp - 1)


def tap_spec(config, model_name: str) -> TapSpec:
    """The tap spec ``[nerve] spec`` names ("auto": the one of ``model_name``); refused, naming the key, when
    nerve has none."""
    spec_name = model_name if config.spec == "auto" else config.spec
    if spec_name not in BUILTIN_SPECS:
        raise ValueError(
            f"[nerve] spec = 'auto' has no tap spec for model.name = {model_name!r}: set [nerve] spec to "
            f"one of {sorted(BUILTIN_SPECS)} if its blocks have the same FFN layout, or turn [nerve] off"
        )
    return BUILTIN_SPECS[spec_name]


class NerveSession:
    """Per-process state of one training job: the monitor, the step source and the writers."""

    def __init__(self, config, job: "JobFacts", groups: ParallelGroups, spec: TapSpec, depth: int | None = None):
        self.config = config  # the [nerve] section (sections.Nerve)
        self.job = job
        self.spec = spec
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
        self.groups = groups
        self.monitor: NerveMonitor | None = None
        # torchtitan's current step, set by the adapter once the Trainer has built what counts steps
        self.current_step: Callable[[], int] | None = None
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
            self._lock = open_jsonl(self.job.jsonl_path)
        if self.config.solve_timing in DEFERRED_TIMINGS:
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
        return None if budget == 0 else max(2, budget // self.job.forwards_per_step)

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
        elif self.current_step is not None:
            self.monitor.begin_step(self.current_step())

    def after_optimizer_step(self, optimizers, args, kwargs) -> None:
        """The optimizers container's step post-hook: the end of torchtitan's current step, on every rank (the
        one place where every rank can issue the merge's collectives at the same step)."""
        self.end_step(self.current_step(), self.processor)

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
        marker that hides that run's stale points (tensorboard_runs.py). Here, at the end of the first step's
        optimizer step, torchtitan has not logged a point of this process yet; a marker after one would hide it too."""
        tb = _tensorboard_logger(metrics_processor)
        if "tensorboard" not in self.config.outputs or tb is None:
            return
        try:
            previous = tensorboard_runs.continue_run(tb, self.job.tensorboard_root, step)
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
        interval = self.job.checkpoint_interval
        return step >= self.job.steps or bool(interval > 0 and step % interval == 0)

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
        tb = _tensorboard_logger(metrics_processor)
        if "tensorboard" in self.config.outputs and tb is None:
            logger.warning("[nerve] outputs has 'tensorboard' but metrics.enable_tensorboard is off on this rank")
        return build_writers(
            self.config.outputs,
            summary_writer=tb.writer if tb is not None else None,
            jsonl=self.job.jsonl_path,
            taps=self.config.taps,
            first_step=self.first_step,
            on_error=self.config.on_error,
        )


def _tensorboard_logger(metrics_processor: MetricsProcessor) -> TensorBoardLogger | None:
    # torchtitan's logger container keeps its loggers in a private list (0.2.2 and 0.3.0 alike); it has no public
    # accessor for the TensorBoard one, whose SummaryWriter nerve writes into so that NerVE sits in the run that
    # holds the loss.
    loggers = getattr(metrics_processor.logger, "_loggers", [])
    return next((x for x in loggers if isinstance(x, TensorBoardLogger)), None)


# The job's NerveSession lives on the objects torchtitan hands the builders: the job's config and the model parts
# it parallelized (the LR scheduler builder gets only the optimizers, which hold them). No module global: two
# Trainers in one process (tests, notebooks) keep their sessions apart.
SESSION_ATTRIBUTE = "_nerve_session"


def session_of(holder) -> NerveSession | None:
    """The NerVE session put on ``holder`` (a job's config, a model part), or None."""
    return getattr(holder, SESSION_ATTRIBUTE, None)


def session_of_parts(model_parts) -> NerveSession | None:
    return next((s for part in model_parts if (s := session_of(part)) is not None), None)
