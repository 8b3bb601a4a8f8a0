"""The torchtitan 0.2.2 adapter's seams, in one process (no torchrun): a spec is wrapped once however often a
patched fork asks, and a step ends in the optimizers container's step post-hook with torchtitan's step number."""

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")

import nerve_plugin.torchtitan  # noqa: E402,F401  (CPU mode, the wrapped built-in specs)
from nerve_plugin.torchtitan import session as sessions  # noqa: E402
from nerve_plugin.torchtitan.v0_2.train_spec import wrap_train_spec  # noqa: E402


def test_a_spec_is_wrapped_once_however_often_it_is_asked():
    from torchtitan.models.llama3 import get_train_spec as llama3_original
    from torchtitan.protocols.train_spec import get_train_spec

    installed = get_train_spec("llama3")  # wrapped by the import above
    assert wrap_train_spec(installed, "llama3") is installed
    once = wrap_train_spec(llama3_original(), "llama3")
    assert once.build_metrics_processor_fn is not llama3_original().build_metrics_processor_fn
    assert wrap_train_spec(once, "llama3") is once


class RecordingSession:
    """What the LR scheduler builder hands the step hook to: a session's after_optimizer_step, reading the step
    from the step source the builder gave it."""

    def __init__(self):
        self.ended = []  # (step, the parameter's value when the step ended)
        self.current_step = None

    def after_optimizer_step(self, optimizers, args, kwargs):
        self.ended.append((self.current_step(), self.parameter.detach().clone()))


def test_a_step_ends_after_the_optimizer_step_with_torchtitans_step_number():
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.protocols.train_spec import get_train_spec

    job_config = ConfigManager().parse_args(["--lr_scheduler.warmup_steps", "1", "--training.steps", "3"])
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    model = nn.Linear(4, 1, bias=False)
    session = RecordingSession()
    session.parameter = model.weight
    setattr(model, sessions.SESSION_ATTRIBUTE, session)  # as the wrapped parallelize_fn does for enabled jobs
    optimizers = build_optimizers([model], job_config.optimizer, dims)
    spec = get_train_spec("llama3")
    assert spec.build_lr_schedulers_fn is not build_lr_schedulers  # the wrapped builder
    schedulers = spec.build_lr_schedulers_fn(optimizers, job_config.lr_scheduler, job_config.training.steps)
    assert session.current_step() == 1  # before the first step

    before = []
    for _ in range(3):  # torchtitan's order: backward, optimizer step, LR step
        before.append(model.weight.detach().clone())
        model(torch.ones(2, 4)).sum().backward()
        optimizers.step()
        optimizers.zero_grad()
        schedulers.step()
    assert [step for step, _ in session.ended] == [1, 2, 3]
    for (_, seen), earlier in zip(session.ended, before):
        assert not torch.equal(seen, earlier)  # the hook saw the parameters after the update
