"""Command-line options derived from the dataclasses that declare them.

Each field of :class:`refimpl.config.RunConfig`, :class:`refimpl.config.Schedule` and
:class:`refimpl.algorithm1.Hyper` carries its default, help, choices and parser in its
metadata (:func:`refimpl.optionspec.option`); :func:`add_options` turns a dataclass
into argparse options (``--lambda-max`` or ``--lambda_max``), and :func:`given` reads
back the ones given. Options default to "not given" (argparse.SUPPRESS), so that a
resumed run can tell the options a user typed from the defaults. ``train``, ``trace``
and the experiments take their run options from here, so a new option is one field.
"""

from __future__ import annotations

import argparse
import dataclasses

from .algorithm1 import Hyper
from .backend import BACKENDS
from .config import RunConfig, Schedule

NOT_GIVEN = argparse.SUPPRESS


def _default_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_options(parser, cls, *, exclude=(), positional: bool = True, title: str | None = None) -> list[str]:
    """One option per declared field of dataclass ``cls`` (not in ``exclude``); returns the field names.

    positional: fields declared positional become an optional positional argument
    (``refimpl train [DATASET]``); otherwise ``--name`` like the rest.
    """
    group = parser.add_argument_group(title) if title else parser
    names = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or not meta["flag"] or f.name in exclude:
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = meta["help"]
        if meta["letter"]:
            help_text = f"interpretation ({meta['letter']}): {help_text}"
        if default is not None and f.name != "tau":
            help_text += f" (default: {_default_text(default)})"
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kw = {"dest": f.name, "default": NOT_GIVEN, "help": help_text}
        if meta["positional"] and positional:
            group.add_argument(f.name, nargs="?", choices=meta["choices"], default=None,  # None: not given
                               metavar=meta["metavar"], help=help_text)
            names.append(f.name)
            continue
        if meta["parse"] is bool:
            kw["action"] = argparse.BooleanOptionalAction if default is None else "store_true"
        elif meta["choices"]:
            kw["choices"] = meta["choices"]
        else:
            kw.update(type=meta["parse"] or type(default), metavar=meta["metavar"] or "X")
        group.add_argument(*flags, **kw)
        names.append(f.name)
    return names


def add_run_options(parser, *, exclude=(), positional: bool = True) -> None:
    """The options that define a run: RunConfig's fields and Algorithm 1's (Hyper's)."""
    add_options(parser, RunConfig, exclude=exclude, positional=positional)
    add_options(parser, Hyper, exclude=exclude,
                title="Algorithm 1 (refimpl.algorithm1.Hyper; see refimpl/INTERPRETATIONS.md)")


def add_backend_option(parser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="array backend (default: $REFIMPL_BACKEND or numpy)")


def given(args, cls, exclude=()) -> dict:
    """The fields of dataclass ``cls`` (not in ``exclude``) given on the command line (a positional left out
    reads None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in exclude and getattr(args, f.name, None) is not None}


def given_run_options(args) -> dict:
    """The RunConfig fields given, with the given Hyper fields as a dict under ``hyper``."""
    config = given(args, RunConfig)
    hyper = given(args, Hyper)
    if hyper:
        config["hyper"] = hyper
    return config


def schedule(args, **defaults) -> Schedule:
    """The Schedule given, over ``defaults`` (e.g. an experiment's), over Schedule's own."""
    return Schedule(**{**defaults, **given(args, Schedule)})


def markdown_table(*classes) -> str:
    """The options of ``classes`` as a Markdown table (docs/cli.md's is this text; a test keeps them equal)."""
    rows = ["| option | default | |", "|---|---|---|"]
    for cls in classes:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta or not meta["flag"]:
                continue
            default = "" if f.default is dataclasses.MISSING or f.default is None else _default_text(f.default)
            if meta["positional"]:
                flag = meta["metavar"]
            elif meta["parse"] is bool:
                flag = f"`--{f.name.replace('_', '-')}`" + (f", `--no-{f.name.replace('_', '-')}`" if f.default is None
                                                              else "")
            else:
                value = "|".join(meta["choices"]) if meta["choices"] else meta["metavar"] or "X"
                flag = f"`--{f.name.replace('_', '-')} {value}`".replace("|", "\\|")
            help_text = meta["help"] + (f" (interpretation ({meta['letter']}))" if meta["letter"] else "")
            rows.append(f"| {flag} | {default} | {help_text} |")
    return "\n".join(rows)



def field_of(name: str):
    """The declared field ``name`` of RunConfig, Schedule or Hyper, or None."""
    for cls in (RunConfig, Schedule, Hyper):
        for f in dataclasses.fields(cls):
            if f.name == name and f.metadata and f.metadata["flag"]:
                return f
    return None


def parser_of(name: str):
    """A function parsing one command-line value of run option ``name`` (None: no such option)."""
    f = field_of(name)
    if f is None:
        return None
    meta = f.metadata
    if meta["choices"]:
        def choice(text):
            if text not in meta["choices"]:
                raise ValueError(f"{name}={text!r}: expected one of {', '.join(meta['choices'])}")
            return text
        return choice
    if meta["parse"] is bool:
        def boolean(text):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name}={text!r}: expected true or false")
            return text.lower() in ("true", "1", "yes")
        return boolean
    return meta["parse"] or type(f.default)


if __name__ == "__main__":  # python -m refimpl.options: docs/cli.md's table of run options
    print(markdown_table(RunConfig, Schedule, Hyper))
