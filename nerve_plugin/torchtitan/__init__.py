"""nerve for torchtitan: the only sub-package that imports torchtitan.

Name it in a torchtitan 0.2.2 job's TOML and turn NerVE on:

    [experimental]
    custom_import = "nerve_plugin.torchtitan"

    [job]
    custom_config_module = "nerve_plugin.torchtitan.config"

    [nerve]
    enable = true

Importing it registers nerve's TrainSpecs under torchtitan's own model names, and on a machine without a GPU
switches torchtitan to CPU mode (see cpu_mode.py; with a GPU that step does nothing): that import is where a
0.2.2 job hands control to its plugins. The version-neutral parts (sections.py, session.py, muon.py, corpus.py,
tokenizer.py, cpu_mode.py, tensorboard_runs.py) sit here; each version's seams in its own sub-package (v0_2/).
"""

from importlib.metadata import PackageNotFoundError, version


def _torchtitan_version() -> str:
    try:
        return version("torchtitan")
    except PackageNotFoundError:  # a source checkout on the path
        import torchtitan

        return getattr(torchtitan, "__version__", "unknown")


TORCHTITAN_VERSION = _torchtitan_version()

if TORCHTITAN_VERSION.startswith("0.2."):
    from .cpu_mode import enable_cpu_mode
    from .v0_2.train_spec import install

    enable_cpu_mode()
    install()
elif not TORCHTITAN_VERSION.startswith("0.3."):
    raise ImportError(
        f"nerve_plugin.torchtitan supports torchtitan 0.2.x (TOML jobs) and 0.3.x; the installed torchtitan is "
        f"{TORCHTITAN_VERSION}. Install one of those, or use nerve's core (nerve_plugin.NerveLoop) directly."
    )
