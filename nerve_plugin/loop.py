"""NerVE in a hand-written training loop (nanoGPT style): name the blocks and the FFN's two projections.

    nerve = NerveLoop(model, blocks="transformer.h", up="mlp.c_fc", down="mlp.c_proj",
                      log_freq=100, jsonl="out/nerve.jsonl")
    for step in range(1, max_steps + 1):
        nerve.begin_step(step)            # before the step's first forward
        ...forwards (micro-batches), backwards, optimizer.step()...
        records = nerve.end_step(step)    # LayerRecords that became ready (written already), or None
    nerve.close()

The loop owns the step: ``begin_step`` arms the taps on logging steps (step 1 and every ``log_freq`` steps),
``end_step`` merges, solves and writes. Everything else is the core's: ``TapSpec``/``FFNTaps`` hooks,
``NerveMonitor``, the JSONL and TensorBoard writers.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch.distributed as dist
from torch import nn

from .monitor import MonitorConfig, NerveMonitor, ParallelGroups
from .records import LayerRecord, records_by_step
from .shutdown import WriteOnStop, WritesOnce
from .solve import DEFERRED_TIMINGS
from .taps import TapPoint, TapSpec, find_blocks
from .writers import OUTPUTS, build_writers, open_jsonl, write_all


def ffn_spec(blocks: str, up: str, down: str) -> TapSpec:
    """A TapSpec from module paths: ``blocks`` is the container whose children are the transformer blocks
    (e.g. "transformer.h"); inside a block, pre is the output of ``up`` (the projection whose output enters
    the nonlinearity: the gate projection of a gated FFN) and post is the input of ``down``."""
    return TapSpec(blocks=blocks, pre=TapPoint(up, "output"), post=TapPoint(down, "input"))


class NerveLoop:
    """A NerveMonitor attached to ``model``, plus the writers its records go to.

    Build it on the plain model, before ``torch.compile`` and DDP/FSDP wrap it (hooks added to a compiled
    module are ignored). ``log_freq``, ``groups`` and ``monitor_options`` (any other ``MonitorConfig`` field,
    e.g. ``taps``, ``layers``, ``max_tokens_per_forward``, ``seed``, ``max_layers_per_step``, ``max_overhead``)
    go to the monitor; ``clock`` is the monitor's step clock (``max_overhead`` times steps with it). ``jsonl``:
    a path, one record per (step, layer) appended; checked here (its folder writable, no other run writing it:
    NerveOutputError names the path) and locked until ``close``. ``tensorboard``: a log directory or an
    existing ``SummaryWriter``. ``on_error``: a writer failing later is reported once and dropped ("warn") or
    raises ("raise").
    Writers are made on the first write, so only the reporting rank (``groups.report_rank``) opens files.
    With ``solve_timing="overlap"`` or ``"stream"`` the records already solved are written on SIGTERM/SIGINT and at exit
    (nerve_plugin.shutdown), then the signal goes on to what handled it before.
    Under data parallelism pass ``groups=ParallelGroups(token_group=torch.distributed.group.WORLD)`` and call
    every method on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: str,
        up: str,
        down: str,
        *,
        log_freq: int = 100,
        jsonl: str | None = None,
        tensorboard=None,
        groups: ParallelGroups | None = None,
        clock: Callable[[], float] = time.perf_counter,
        **monitor_options,
    ):
        config = MonitorConfig(log_freq=log_freq, **monitor_options)
        spec = ffn_spec(blocks, up, down)
        if config.layers is not None:
            # One model, all of it here (no pipeline stages): a layer it does not have would never be measured.
            known = {index for index, _ in find_blocks(model, spec)}
            if any(layer not in known for layer in config.layers):
                raise ValueError(
                    f"[nerve] layers = {config.layers} is not allowed: expected indices of the "
                    f"model's {len(known)} blocks (0..{len(known) - 1}), or None for all"
                )
        groups = groups or ParallelGroups()
        reporting = not dist.is_initialized() or dist.get_rank() == groups.report_rank
        # Before any hook or step: an unwritable path, or another run writing it, stops here, not at step 1.
        self._lock = open_jsonl(jsonl) if jsonl is not None and reporting else None
        try:
            self.monitor = NerveMonitor(model, spec, config, groups, clock=clock).attach()
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self._jsonl = jsonl
        self._tensorboard = tensorboard
        self._owned_summary_writer = None
        self._writers: list | None = None
        self._writes = WritesOnce(self._write_now)
        self._stop = None
        if config.solve_timing in DEFERRED_TIMINGS and reporting:
            self._stop = WriteOnStop(self.monitor.ready_records, self._writes.write_on_stop).install()

    @property
    def layers(self) -> list[int]:
        return self.monitor.layers

    def begin_step(self, step: int) -> None:
        """Before the step's first forward; calling it again in the same step (per micro-batch, or after
        ``pause``) keeps what was captured."""
        self.monitor.begin_step(step)

    def pause(self) -> None:
        """Stop capturing until the next ``begin_step``: wrap evaluation forwards inside a step with it."""
        self.monitor.pause()

    def end_step(self, step: int) -> list[LayerRecord] | None:
        """After the step's last backward (or its optimizer step), on every rank. Returns the records that
        became ready, after writing them ([] on ranks that do not report), or None."""
        records = self.monitor.end_step(step)
        if records:
            self._writes.write(records)
        return records

    def flush(self) -> list[LayerRecord]:
        """Records still pending in the monitor (eigen-solves that finish after their step), written and
        returned."""
        flush = getattr(self.monitor, "flush", None)
        records = (flush() or []) if flush is not None else []
        if records:
            self._writes.write(records)
        return records

    def close(self) -> list[LayerRecord]:
        """Flush, then remove every hook; the model is as it was. Returns what ``flush`` returned."""
        try:
            return self.flush()
        finally:
            if self._stop is not None:
                self._stop.uninstall()
                self._stop = None
            self.monitor.close()
            if self._owned_summary_writer is not None:
                self._owned_summary_writer.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "NerveLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_now(self, records: list[LayerRecord]) -> None:
        if self._writers is None:
            self._writers = self._build_writers()
        for step, step_records in records_by_step(records).items():
            self._writers = write_all(self._writers, step, step_records, self.monitor.config.on_error)

    def _build_writers(self) -> list:
        summary_writer = self._tensorboard
        if isinstance(summary_writer, (str, os.PathLike)):
            from torch.utils.tensorboard import SummaryWriter

            summary_writer = self._owned_summary_writer = SummaryWriter(summary_writer)
        config = self.monitor.config
        return build_writers(
            OUTPUTS, summary_writer=summary_writer, jsonl=self._jsonl, taps=config.taps, on_error=config.on_error
        )
