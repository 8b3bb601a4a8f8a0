"""torchtitan 0.2.2's custom JobConfig: nerve's sections merged into torchtitan's TOML config, and their checks.

    [job]
    custom_config_module = "nerve_plugin.torchtitan.config"   # which imports this module

    [nerve]
    enable = true

torchtitan 0.2.2 reads a TOML file into dataclasses and then the command line through tyro; nerve checks its
sections' keys in both before torchtitan sees them (torchtitan names an unknown key but not the allowed ones),
and takes the renamed keys under their old names with a deprecation warning.
"""

# No `from __future__ import annotations` here: torchtitan merges config dataclasses by their real field types.

import sys
from dataclasses import dataclass, field, fields, is_dataclass

from torchtitan.config.manager import ConfigManager

from nerve_plugin.config_checks import renamed_keys
from nerve_plugin.monitor import RENAMED_KEYS
from nerve_plugin.torchtitan.muon import MuonConfigError, MuonSection
from nerve_plugin.torchtitan.sections import Nerve, NerveConfigError
from nerve_plugin.variants.config import Variant, VariantConfigError


@dataclass
class JobConfig:
    nerve: Nerve = field(default_factory=Nerve)
    muon: MuonSection = field(default_factory=MuonSection)  # read when [optimizer] name = "Muon"
    variant: Variant = field(default_factory=Variant)  # options of the nerve_llama model family


def _nerve_sections(config_cls) -> list[str]:
    # a custom JobConfig that extends [nerve] gets a merged subclass of Nerve from torchtitan
    return [f.name for f in fields(config_cls) if isinstance(f.type, type) and issubclass(f.type, Nerve)]


def rename_keys_in_toml(config_cls, toml: dict) -> None:
    """The [nerve] keys that were renamed (RENAMED_KEYS), put under their new names in the parsed TOML, with a
    warning naming the new key."""
    for name in _nerve_sections(config_cls):
        if isinstance(toml.get(name), dict):
            toml[name] = renamed_keys(toml[name], RENAMED_KEYS, name, NerveConfigError, stacklevel=3)


def rename_options(config_cls, args: list[str]) -> list[str]:
    """The command line with the renamed [nerve] keys' options (``--nerve.solve overlap``,
    ``--nerve.eigen-solve=spread``) spelled with their new names, with a warning naming the new key."""
    sections = set(_nerve_sections(config_cls))
    out, given = [], {}
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        section, _, key = option[2:].replace("-", "_").partition(".") if option.startswith("--") else ("", "", "")
        if section in sections and (key in RENAMED_KEYS or key in RENAMED_KEYS.values()):
            # the value, for the warning: "--nerve.solve=overlap" or "--nerve.solve overlap"
            given.setdefault(section, {})[key] = value if equals or i + 1 == len(args) else args[i + 1]
            if key in RENAMED_KEYS:
                arg = f"--{section}.{RENAMED_KEYS[key]}{equals}{value}"
        out.append(arg)
    for section, keys in given.items():
        renamed_keys(keys, RENAMED_KEYS, section, NerveConfigError, stacklevel=4)  # warns, refuses both names
    return out


def check_sections(config_cls, toml: dict) -> None:
    """The keys of nerve's sections in a TOML table, before torchtitan reads them: torchtitan names an unknown
    key but not the allowed ones, and silently drops a section that is not a table (`nerve = true`)."""
    errors = {Nerve: NerveConfigError, MuonSection: MuonConfigError, Variant: VariantConfigError}
    for f in fields(config_cls):
        # a custom JobConfig that extends a section gets a merged subclass of it from torchtitan
        section = next((c for c in errors if isinstance(f.type, type) and issubclass(f.type, c)), None)
        if section is None or f.name not in toml:
            continue
        keys = ", ".join(k.name for k in fields(section))
        if not isinstance(toml[f.name], dict):
            raise errors[section](
                f"{f.name} = {toml[f.name]!r} is not allowed: expected a [{f.name}] table with keys from {keys}"
            )
        for key in toml[f.name]:
            if key not in {k.name for k in fields(f.type)}:
                raise errors[section](f"[{f.name}] {key} is not a key of [{f.name}]: expected one of {keys}")


def check_flag_values(config_cls, args: list[str]) -> None:
    """The command line's bool keys of nerve's sections, before tyro reads them. tyro makes each one a flag pair
    that takes no value (``--nerve.enable`` / ``--nerve.no-enable``), so in ``--nerve.enable 3`` or
    ``--nerve.enable=true`` the value is left over and tyro names only it ("Unrecognized options: 3").
    Stops like tyro does (the message on stderr, exit status 2), naming the option and what it accepts."""
    sections = (Nerve, MuonSection, Variant)
    flags: dict[str, set[str]] = {}
    for f in fields(config_cls):
        if isinstance(f.type, type) and issubclass(f.type, sections):
            flags[f.name] = {k.name for k in fields(f.type) if k.type in (bool, "bool")}
    for i, arg in enumerate(args):
        option, has_value, value = arg.partition("=")
        if not option.startswith("--") or "." not in option:
            continue
        section, _, key = option[2:].replace("-", "_").partition(".")
        name = key[3:] if key.startswith("no_") and key[3:] in flags.get(section, ()) else key
        if name not in flags.get(section, ()):
            continue
        given = arg
        if not has_value and i + 1 < len(args) and not args[i + 1].startswith("-"):
            has_value, given = True, f"{arg} {args[i + 1]}"
        if has_value:
            on, off = f"--{section}.{name}", f"--{section}.no-{name.replace('_', '-')}"
            print(
                f"{given}: {option} is a flag and takes no value: expected {on} (true) or {off} "
                f"(false); in a TOML, [{section}] {name} = true or false",
                file=sys.stderr,
            )
            raise SystemExit(2)


class _FlagCheckingTyro:
    """tyro as torchtitan's ConfigManager sees it: the same module, whose cli() first checks nerve's flags."""

    def __init__(self, tyro):
        self.tyro = tyro

    def __getattr__(self, name):
        return getattr(self.tyro, name)

    def cli(self, config_cls, *args, **kwargs):
        args_ = kwargs.get("args")
        kwargs["args"] = rename_options(config_cls, list(sys.argv[1:] if args_ is None else args_))
        check_flag_values(config_cls, kwargs["args"])
        return self.tyro.cli(config_cls, *args, **kwargs)


def _install_cli_check() -> None:
    # ConfigManager.parse_args imports this module (custom_config_module) and then hands its raw arguments to
    # tyro.cli, which it looks up in its own module at that moment: the one place where nerve sees them first.
    import torchtitan.config.manager as manager

    if not isinstance(manager.tyro, _FlagCheckingTyro):
        manager.tyro = _FlagCheckingTyro(manager.tyro)


def _install_section_check() -> None:
    # torchtitan imports this module (custom_config_module) before it turns the TOML into dataclasses, on every
    # rank alike and before any collective; checking there stops every rank at start-up with the same message.
    original = ConfigManager._dict_to_dataclass
    if getattr(original, "nerve_checks_sections", False):
        return

    def _dict_to_dataclass(self, cls, data):
        if is_dataclass(cls) and isinstance(data, dict):
            rename_keys_in_toml(cls, data)
            check_sections(cls, data)
        return original(self, cls, data)

    _dict_to_dataclass.nerve_checks_sections = True
    ConfigManager._dict_to_dataclass = _dict_to_dataclass


_install_section_check()
_install_cli_check()
