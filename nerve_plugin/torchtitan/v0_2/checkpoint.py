"""Load a torchtitan DCP checkpoint of our model family into a plain CPU model, in one process, for analysis.

torchtitan's checkpointer writes ``<dump_folder>/<checkpoint.folder>/step-N`` with torch.distributed.checkpoint
(DCP): the model's state dict flattened to top-level keys (``layers.0.feed_forward.w1.weight``), next to
``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state`` in full checkpoints. Only the model keys
are read, whatever sharding wrote them (DCP reshards on load).

The model is built the way torchtitan's Trainer builds it, from the run's job config: the TrainSpec of
``model.name`` (``llama3``, ``nerve_llama``, ...), ``model_args[model.flavor]``, ``update_from_config`` (which
applies ``training.seq_len`` and, for nerve_llama, the ``[variant]`` section), on the meta device, then
materialised on the CPU and filled from the checkpoint.

    loaded = load_checkpoint("outputs/run/checkpoint", "run.toml")
    results = NerVEAnalyzer(loaded.model).analyze(input_ids)
"""

from __future__ import annotations

import copy
import importlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.protocols.train_spec import get_train_spec

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
NERVE_CONFIG_MODULE = "nerve_plugin.torchtitan.config"


class CheckpointError(ValueError):
    pass


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    step_dir: Path
    step: int | None
    model_name: str
    flavor: str
    job_config: JobConfig


def find_step_dir(path: str | Path) -> Path:
    """A DCP checkpoint directory: ``path`` itself (it holds ``.metadata``), else the latest ``step-N`` under
    ``path``, ``path/checkpoint`` (a dump folder)."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    for folder in (path, path / "checkpoint"):
        steps = (
            sorted(
                (
                    (int(m[1]), child)
                    for child in folder.glob("step-*")
                    if (m := _STEP_DIR.match(child.name)) and (child / ".metadata").is_file()
                ),
                key=lambda pair: pair[0],
            )
            if folder.is_dir()
            else []
        )
        if steps:
            return steps[-1][1]
    if path.is_dir() and any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"{path} holds a HuggingFace safetensors checkpoint (checkpoint.last_save_in_hf), "
            "not DCP: load it with transformers and analyse that model"
        )
    raise CheckpointError(
        f"no torchtitan DCP checkpoint at {path}: expected a step-N directory (with .metadata), "
        "a checkpoint folder holding step-N directories, or a dump folder with checkpoint/"
    )


def load_job_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """The job config of a run, parsed by torchtitan (its TOML, then ``overrides`` as command-line arguments,
    e.g. ``["--model.flavor", "debugmodel", "--variant.activation", "relu"]``)."""
    args = list(map(str, overrides))
    if config_file is None:
        args = ["--model.hf_assets_path", "", *args]  # torchtitan's default names a test folder that is not here
    else:
        if not Path(config_file).is_file():
            raise CheckpointError(f"job config {config_file} does not exist")
        args = ["--job.config_file", str(config_file), *args]
    if any(a.startswith("--variant.") for a in args) and not _names_config_module(config_file, args):
        args += ["--job.custom_config_module", NERVE_CONFIG_MODULE]
    return ConfigManager().parse_args(args)


def _names_config_module(config_file, args) -> bool:
    if any(a.split("=")[0] in ("--job.custom_config_module", "--job.custom-config-module") for a in args):
        return True
    if config_file is None:
        return False
    import tomllib

    with open(config_file, "rb") as f:
        return bool(tomllib.load(f).get("job", {}).get("custom_config_module"))


def build_model(job_config: JobConfig, attention: str | None = "sdpa") -> nn.Module:
    """The run's model on the CPU, parameters uninitialised (to be loaded), non-persistent buffers computed.

    ``attention``: the attention kernel to run with. flex/varlen flavors need masks built from the training
    batches' document boundaries; offline their weights are run with plain causal SDPA. None keeps the flavor's.
    """
    custom_import = job_config.experimental.custom_import
    if custom_import:
        importlib.import_module(custom_import)  # as the Trainer does: it may register the model's TrainSpec
    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        spec = get_train_spec(name)
    except ValueError as e:
        raise CheckpointError(f"model.name = {name!r}: {e}") from None
    if flavor not in spec.model_args:
        raise CheckpointError(
            f"model.flavor = {flavor!r} is not a flavor of {name!r}: expected one of "
            f"{', '.join(map(repr, spec.model_args))}"
        )
    model_args = copy.deepcopy(spec.model_args[flavor])
    model_args.update_from_config(job_config)
    if attention is not None and getattr(model_args, "attn_type", attention) != attention:
        logger.info(f"running the {model_args.attn_type} flavor {flavor!r} with {attention} attention")
        model_args.attn_type = attention
    with torch.device("meta"):
        model = spec.model_cls(model_args)
    model.to_empty(device="cpu")
    persistent = set(model.state_dict())
    transient = [n for n, _ in model.named_buffers() if n not in persistent]
    with torch.no_grad():
        if transient == ["freqs_cis"] and hasattr(model, "_precompute_freqs_cis"):
            model.freqs_cis = model._precompute_freqs_cis()
        elif transient:
            model.init_weights(buffer_device=torch.device("cpu"))  # recomputes every buffer; weights get loaded
    return model


def load_weights(model: nn.Module, step_dir: str | Path) -> None:
    """Fill every entry of ``model.state_dict()`` from the DCP checkpoint at ``step_dir`` (other keys, such as
    optimizer state, are not read). Stored dtypes are converted to the model's."""
    reader = dcp.FileSystemReader(str(step_dir))
    stored = reader.read_metadata().state_dict_metadata
    state = model.state_dict()
    missing = [k for k in state if k not in stored]
    if missing:
        raise CheckpointError(
            f"{step_dir} lacks {len(missing)} of the model's {len(state)} tensors, e.g. {missing[:3]}: is "
            "model.name / model.flavor / [variant] the run's?"
        )
    targets = {}
    for key, tensor in state.items():
        meta = stored[key]
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f"{step_dir}: {key!r} is not stored as a tensor")
        if tuple(meta.size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{step_dir}: {key!r} has shape {tuple(meta.size)} in the checkpoint and {tuple(tensor.shape)} in "
                "the model built from the job config: check model.flavor, training.seq_len and [variant]"
            )
        same = meta.properties.dtype == tensor.dtype
        targets[key] = tensor if same else torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(targets, storage_reader=reader)
    with torch.no_grad():
        for key, tensor in state.items():
            if targets[key] is not tensor:
                tensor.copy_(targets[key])


def load_checkpoint(
    path: str | Path,
    config_file: str | Path | None = None,
    *,
    model_name: str | None = None,
    flavor: str | None = None,
    variant: dict | None = None,
    overrides: Sequence[str] = (),
    attention: str | None = "sdpa",
) -> LoadedCheckpoint:
    """Build the run's model on the CPU and load a checkpoint into it (one process, no process group).

    ``path``: a step-N directory, a checkpoint folder (its latest step) or a dump folder. ``config_file``: the
    run's TOML; ``model_name``, ``flavor``, ``variant`` ({key: value} of ``[variant]``) and ``overrides``
    (torchtitan command-line arguments) override it or stand in for it.
    """
    step_dir = find_step_dir(path)
    args = list(overrides)
    if model_name is not None:
        args += ["--model.name", model_name]
    if flavor is not None:
        args += ["--model.flavor", flavor]
    for key, value in (variant or {}).items():
        args += [f"--variant.{key}", str(value)]
    job_config = load_job_config(config_file, args)
    if variant and job_config.model.name != "nerve_llama":
        raise CheckpointError(
            f"[variant] options apply to model.name = 'nerve_llama' only, not {job_config.model.name!r}"
        )
    model = build_model(job_config, attention=attention)
    load_weights(model, step_dir)
    model.eval()
    match = _STEP_DIR.match(step_dir.name)
    return LoadedCheckpoint(
        model, step_dir, int(match[1]) if match else None, job_config.model.name, job_config.model.flavor, job_config
    )
