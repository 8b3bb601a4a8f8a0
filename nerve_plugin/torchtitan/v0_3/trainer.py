"""NerVE inside torchtitan 0.3.0's Trainer: ``NerveTrainer`` adds the ``[nerve]`` section and starts a session.

torchtitan 0.3.0 builds everything in ``Trainer.__init__`` from ``config.model_spec`` and the config sections.
The model spec's ``parallelize_fn`` is wrapped: on a machine without a GPU it first makes the model trainable
there (cpu.py), and with ``nerve.enable`` the taps are attached to the model (or to
each pipeline stage: pipelining calls the same function per stage) before torchtitan's TP, activation
checkpointing, compile and FSDP; after ``Trainer.__init__`` the session gets the Trainer's own step counter, the
optimizers container's step post-hook (the end of a step: 0.3.0 asks ``should_log`` at the start of a step) and
the metrics processor (whose TensorBoard run nerve writes into).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torchtitan.trainer import Trainer

from nerve_plugin.torchtitan.sections import Nerve
from nerve_plugin.torchtitan.v0_3.cpu import use_causal_sdpa
from nerve_plugin.torchtitan.session import (
    SESSION_ATTRIBUTE,
    NerveSession,
    job_facts,
    process_groups,
    tap_spec,
)


def config_values(config) -> dict:
    """The values of a config dataclass's constructor fields: what rebuilds it as another (sub)class."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


class NerveTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        nerve: Nerve = field(default_factory=Nerve)
        """NerVE: the FFN eigen-spectra of every block (README, "Options")."""

    def __init__(self, config: Config):
        self.nerve_session: NerveSession | None = None
        spec = config.model_spec
        pipelining_fn = spec.pipelining_fn
        if config.nerve.enable and pipelining_fn is not None:
            pipelining_fn = self._watching(pipelining_fn)
        config.model_spec = dataclasses.replace(
            spec, parallelize_fn=self._parallelizing(config, spec.parallelize_fn), pipelining_fn=pipelining_fn
        )
        super().__init__(config)
        session = self.nerve_session
        if session is None:
            return
        session.current_step = lambda: self.step  # the Trainer counts it; incremented before each train_step
        self.optimizers.register_step_post_hook(session.after_optimizer_step)
        session.start(self.metrics_processor)

    def _parallelizing(self, config: Config, parallelize_fn):
        """``parallelize_fn`` that first adapts the model (part) it is handed to a CPU (cpu.py; nothing on a GPU)
        and, with NerVE on, attaches the taps to it."""

        def parallelize(model, *, parallel_dims, **kwargs):
            use_causal_sdpa(model)
            if config.nerve.enable:
                session = self._session(config, parallel_dims)
                session.attach(model)
                setattr(model, SESSION_ATTRIBUTE, session)
            return parallelize_fn(model, parallel_dims=parallel_dims, **kwargs)

        return parallelize

    def _watching(self, pipelining_fn):
        """``pipelining_fn`` whose schedule counts only its microbatch forwards (it hands the stages to the
        wrapped ``parallelize_fn``, which attaches the taps). Not run in the CPU tests: torchtitan 0.3.0's own PP
        fails there with torch 2.13, NerVE off ("Decoder.forward() got an unexpected keyword argument
        'arg_mbs'")."""

        def pipelining(*args, **kwargs):
            schedule, *rest = pipelining_fn(*args, **kwargs)
            if self.nerve_session is not None and self.nerve_session.monitor is not None:
                self.nerve_session.watch_pipeline(schedule)
            return (schedule, *rest)

        return pipelining

    def _session(self, config: Config, parallel_dims) -> NerveSession:
        if self.nerve_session is None:
            spec = config.model_spec
            facts = job_facts(
                config.dump_folder,
                config.training,
                config.parallelism,
                config.checkpoint,
                config.metrics,
                parallel_dims,
            )
            groups = process_groups(parallel_dims, config.parallelism.pipeline_parallel_schedule)
            depth = len(getattr(spec.model, "layers", ()) or ()) or None
            self.nerve_session = NerveSession(config.nerve, facts, groups, tap_spec(config.nerve, spec.name), depth)
        return self.nerve_session

    def close(self) -> None:
        try:
            if self.nerve_session is not None:
                self.nerve_session.close()
        finally:
            super().close()
