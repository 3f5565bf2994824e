"""Settings helpers: a dataclass field that is also a command-line flag, and the check of its choices.

Skip this file on a first reading. Every module with settings (`treerl.RolloutConfig`,
`policy.PolicyConfig`, `tasks.TaskConfig`, ...) declares them as dataclass fields made by `arg`;
train.py composes those dataclasses into one command line (transformers' HfArgumentParser: a
field's type, default and help make a flag, a `Literal` its choices) and calls each one's
`validate`, which starts with `check_choices`.

The two helpers live here, below every module that has settings, so that a module with settings
does not import the algorithm (treerl.py) to declare them.
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Literal, get_args, get_origin, get_type_hints


def arg(default, help: str):
    """A configuration field with its --help line (dataclasses become flags: train.parse_config)."""
    return field(default=default, metadata={"help": help})


def check_choices(config, cls: type) -> None:
    """Every `Literal` field of dataclass `cls` holds one of its values in `config` (the flag
    parser checks the command line; this checks configurations built in code)."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if get_origin(hint) is Literal and getattr(config, f.name) not in get_args(hint):
            raise ValueError(f"--{f.name} must be one of {', '.join(get_args(hint))}; got {getattr(config, f.name)!r}")
