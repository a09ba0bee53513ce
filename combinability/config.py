"""``--config FILE``: a subcommand's options read from a TOML or YAML file.

The keys are the subcommand's long option names, with dashes or underscores
(``batch-size = 500`` or ``batch_size: 500``); options given on the command line win
over the file. The file's values become command-line tokens that are parsed by the
subcommand's own parser, so they are converted and checked exactly as typed options are.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_config", "config_arguments", "option_names"]

#: Options that cannot come from a config file.
_NOT_CONFIGURABLE = {"--help", "--config", "--version"}


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping held by a TOML (``.toml``) or YAML (``.yaml``, ``.yml``) file.

    Raises
    ------
    ConfigurationError
        If the file cannot be read or parsed, its suffix is neither, or it does not hold
        a mapping (a TOML table or a YAML mapping) at its top level.
    """
    from combinability.errors import ConfigurationError

    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigurationError(f"--config {file}: unknown file type {suffix or '(none)'!r}; valid: .toml, .yaml, "
                                 ".yml")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"--config {file}: cannot read it ({exc})") from None
    try:
        if suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError: the parser's own message
        raise ConfigurationError(f"--config {file}: not valid {suffix[1:].upper()}: "
                                 f"{' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"--config {file}: expected a mapping of option names to values at the top level, "
                                 f"got a {type(data).__name__}")
    return dict(data)


def option_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's configurable long options, by name without dashes (``"batch-size"``)."""
    names = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--") and s not in _NOT_CONFIGURABLE]
        if longs and not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            names[longs[0][2:]] = action
    return names


def _given(action: argparse.Action, command_line: Sequence[str]) -> bool:
    """Whether ``action`` appears in ``command_line`` (``--opt``, ``--opt=value``, ``-o``, ``-ovalue``)."""
    for token in command_line:
        if token == "--":
            return False
        for flag in action.option_strings:
            if token == flag or flag.startswith("--") and token.startswith(flag + "="):
                return True
            if not flag.startswith("--") and token.startswith(flag) and not token.startswith("--"):
                return True
    return False


def _tokens(key: str, action: argparse.Action, value: Any, where: str) -> list[str]:
    """Command-line tokens that give ``value`` to ``action``."""
    from combinability.errors import ConfigurationError

    flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
    if action.nargs == 0:  # store_true, store_false, count
        if isinstance(action, argparse._CountAction) and isinstance(value, int) and not isinstance(value, bool):
            return [flag] * value
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where}: {key!r} is a switch; give true or false, not {value!r}")
        if isinstance(action, argparse._StoreFalseAction):
            return [] if value else [flag]
        return [flag] if value else []
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not many and len(items) != 1:
        raise ConfigurationError(f"{where}: {key!r} takes one value, not a list ({value!r})")
    for item in items:
        if isinstance(item, Mapping | list | tuple | bool) or item is None:
            raise ConfigurationError(f"{where}: {key!r} must be a number or a string, not {item!r}")
        _check_value(key, action, flag, item, where)
    if isinstance(action, argparse._AppendAction):
        return [f"{flag}={item}" for item in items]
    if many:
        return [flag, *(str(item) for item in items)]
    return [f"{flag}={items[0]}"]


def _check_value(key: str, action: argparse.Action, flag: str, item: Any, where: str) -> None:
    """Refuse, naming the file, a value that ``flag``'s type or choices would refuse on the command line."""
    from combinability.errors import ConfigurationError

    value: Any = str(item)
    if callable(action.type):
        try:
            value = action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            kind = getattr(action.type, "__name__", "")
            detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) or kind not in ("int", "float") \
                else f"not {'an integer' if kind == 'int' else 'a number'}"
            raise ConfigurationError(f"{where}: {key} = {item!r} is not a valid value of {flag} ({detail})") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigurationError(f"{where}: {key} = {item!r} is not a valid value of {flag}; valid: "
                                 f"{', '.join(map(str, action.choices))}")


def config_arguments(parser: argparse.ArgumentParser, config: Mapping[str, Any], command_line: Sequence[str],
                     *, where: str = "--config") -> list[str]:
    """Command-line tokens for the options of ``config`` not already given on ``command_line``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser: its long options are the valid keys.
    config : mapping
        Option name (dashes or underscores, with or without leading ``--``) to value:
        a switch takes ``true``/``false``, a repeatable or multi-value option a list.
        ``null`` values are ignored (the option keeps its default).
    command_line : sequence of str
        The tokens typed by the user; options found there keep the typed value.
    where : str
        Names the file in error messages.

    Raises
    ------
    ConfigurationError
        If a key is not one of the subcommand's options (the message lists the valid
        ones), or a value has the wrong kind.
    """
    from combinability.errors import ConfigurationError

    actions = option_names(parser)
    unknown = [k for k in config if str(k).lstrip("-").replace("_", "-") not in actions]
    if unknown:
        raise ConfigurationError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))} for "
                                 f"'{parser.prog}'; valid: {', '.join(sorted(actions))}")
    tokens: list[str] = []
    for key, value in config.items():
        action = actions[str(key).lstrip("-").replace("_", "-")]
        if value is None or _given(action, command_line):
            continue
        tokens += _tokens(str(key), action, value, where)
    return tokens
