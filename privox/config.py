"""
Settings from a TOML file and the command line, into one typed record.

Each daemon describes its settings once, as a frozen dataclass whose fields
have defaults and a C{help} in their metadata. L{optionsFor} turns that into
a C{twisted.python.usage.Options} with one C{--long-option} per field plus
C{--config FILE}. Precedence: defaults < file < command line.

In the TOML file each key is the long option's name without the dashes
(C{stt-listen = "tcp:1776"}). A boolean setting is a switch on the command
line (C{--blur-usage}) and C{true}/C{false} in the file.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from typing import Any, Callable, TypeVar

from twisted.python import usage

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:
    """
    A dataclass field for a setting.
    """
    return dataclasses.field(default=default, metadata={"help": help})


def optionName(fieldName: str) -> str:
    return fieldName.replace("_", "-")


_TRUE = frozenset(["true", "yes", "on", "1"])
_FALSE = frozenset(["false", "no", "off", "0"])


def _coerce(name: str, kind: type, value: Any, where: str) -> Any:
    if kind is bool:
        # A switch: a TOML boolean, or a word (true/false, yes/no, on/off, 1/0).
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise usage.UsageError(
            f"{optionName(name)} {where}: expected true or false, got {value!r}"
        )
    if kind is tuple:
        # Repeatable options: a TOML array (or one string) of strings.
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise usage.UsageError(
                f"{optionName(name)} {where}: expected a list of strings, got {value!r}"
            )
        return tuple(items)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        if kind is str or isinstance(value, bool):
            raise TypeError
        if isinstance(value, str) or (kind is float and isinstance(value, int)):
            return kind(value)
        raise TypeError
    except (TypeError, ValueError):
        raise usage.UsageError(
            f"{optionName(name)} {where}: expected {kind.__name__}, got {value!r}"
        )


def loadToml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise usage.UsageError(f"cannot read config file {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"config file {path} is not valid TOML: {e}")


def resolve(
    settingsType: Callable[..., T],
    fromFile: dict[str, Any],
    fromCommandLine: dict[str, Any],
    filename: str = "the config file",
) -> T:
    """
    Merge the sources over C{settingsType}'s defaults, checking names and
    types. C{fromCommandLine} holds L{None} for options not given.
    """
    fields = {f.name: f for f in dataclasses.fields(settingsType)}  # type: ignore[arg-type]
    unknown = sorted(set(fromFile) - {optionName(n) for n in fields})
    if unknown:
        raise usage.UsageError(
            f"unknown setting(s) in {filename}: {', '.join(unknown)}"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        kind = type(f.default)
        if fromCommandLine.get(name) is not None:
            values[name] = _coerce(name, kind, fromCommandLine[name], "on the command line")
        elif optionName(name) in fromFile:
            values[name] = _coerce(name, kind, fromFile[optionName(name)], f"in {filename}")
    return settingsType(**values)


def _appender(fieldName: str, help: str) -> Callable[[usage.Options, str], None]:
    def opt(self: usage.Options, value: str) -> None:
        self.setdefault(optionName(fieldName), []).append(value)

    opt.__doc__ = f"{help} (repeatable)"
    return opt


def optionsFor(settingsType: type[T], description: str) -> type[usage.Options]:
    """
    A usage.Options class for C{settingsType}; after parsing, the result is in
    C{options.settings}.
    """
    parameters: list[list[Any]] = [
        ["config", "c", None, "TOML file of settings (keys are option names)."]
    ]
    flags: list[list[Any]] = []
    repeatable: dict[str, Callable[..., None]] = {}
    for f in dataclasses.fields(settingsType):  # type: ignore[arg-type]
        help = f.metadata.get("help", "")
        if isinstance(f.default, bool):
            # A switch: given on the command line, it turns the setting on.
            flags.append([optionName(f.name), None, help])
        elif isinstance(f.default, tuple):
            repeatable[f"opt_{f.name}"] = _appender(f.name, help)
        else:
            parameters.append([optionName(f.name), None, None, f"{help} [default: {f.default}]"])

    class Options(usage.Options):
        synopsis = f"[options]\n{description}"
        optParameters = parameters
        optFlags = flags
        settings: T

        def parseOptions(self, options: Any = None) -> None:
            try:
                super().parseOptions(options)
            except usage.UsageError as e:
                if self.parent is None:
                    raise
                # Under twistd, which would print every option before it:
                # the reason alone, on one line.
                sys.stderr.write(
                    f"twistd {self.parent.subCommand}: {e} (--help lists every option)\n"
                )
                raise SystemExit(1) from None

        def postOptions(self) -> None:
            path = self["config"]
            fromFile = loadToml(path) if path else {}
            commandLine = {
                f.name: self.get(optionName(f.name))
                for f in dataclasses.fields(settingsType)  # type: ignore[arg-type]
            }
            for f in dataclasses.fields(settingsType):  # type: ignore[arg-type]
                # An absent switch (0) leaves the file's value in place.
                if isinstance(f.default, bool) and not commandLine[f.name]:
                    commandLine[f.name] = None
            self.settings = resolve(settingsType, fromFile, commandLine, path or "")

    for name, method in repeatable.items():
        setattr(Options, name, method)
    return Options
