"""Run folders: one run per folder, started over, continued or refused, and its checkpoints pruned.

Skip this file on a first reading. `python train.py` writes a run to <output_dir>/<run_name>/ (each
preset in configs/ names its own) and records its settings there (config.json). Before anything
else, `open_run_dir` decides what the folder may become:

- it holds a run of other settings: the command stops with an error that names them and the ways on
  (another --run_name, the folder's settings, or --overwrite), and the folder stays as it was;
- --resume: the folder's run continues from its latest checkpoint (train.load), only with its
  settings;
- otherwise (an empty or new folder, the same command run again, or --overwrite) the run starts
  over: the folder is cleared, except the cached warm start (warmstart/) when this run would make the
  same one (its recipe.json says so; it costs minutes, e.g. 600 supervised steps in the default run).

A folder with files but no config.json is not a run of train.py: it is left alone unless --overwrite.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import policy

# Settings that do not define a run, left out when a folder's config.json is compared with a
# command's: where the run lives (a moved or renamed folder holds the same run), how this command
# treats the folder (--resume, --overwrite), how often it checkpoints (saving changes nothing the
# run computes), how it holds memory (--lean_heap) and what it logs (--log_grad_parts). Every other
# setting, batch sizes and the device included, may change what a run computes, and so defines it.
NOT_DEFINING = ("run_name", "output_dir", "resume", "overwrite", "save_every", "lean_heap", "log_grad_parts")


def open_run_dir(config) -> Path:
    """<output_dir>/<run_name>/ of `config` (train.Config), made ready for its run as the module
    docstring says, with the run's config.json written."""
    run = config.run
    run_dir = Path(run.output_dir) / run.run_name
    saved = run_dir / "config.json"
    if saved.exists() and not run.overwrite:
        differences = settings_differences(json.loads(saved.read_text()), config)
        if differences:
            listed = "; ".join(differences[:6]) + (f"; {len(differences) - 6} more" if len(differences) > 6 else "")
            raise SystemExit(
                f"train.py: error: {run_dir} holds a run of other settings ({listed}). Name another folder "
                f"(--run_name), give the folder's settings (with --resume to continue its run), or discard "
                f"that run and start over (--overwrite)."
            )
    if run_dir.is_dir() and not run.resume:
        found = [path for path in run_dir.iterdir() if path.name != "warmstart"]
        if found and not saved.exists() and not run.overwrite:  # not a run of train.py: leave it alone
            raise SystemExit(
                f"train.py: error: {run_dir} holds files but no run (no config.json): choose another "
                f"--run_name, or clear it with --overwrite."
            )
        if found:
            why = "--overwrite" if run.overwrite else "a run of the same settings (--resume would continue it)"
            print(f"{run_dir}: {why}: starting over, the folder cleared", flush=True)
        recipe = run_dir / "warmstart" / "recipe.json"
        same = policy.warm_start_recipe(config.policy, config.task, run.seed)
        keep_warm_start = recipe.exists() and json.loads(recipe.read_text()) == same
        for path in run_dir.iterdir():
            if path.name == "warmstart" and keep_warm_start:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config.as_dict(), indent=2))
    return run_dir


def settings_differences(saved: dict, config) -> list[str]:
    """The defining settings (all but NOT_DEFINING) in which a folder's run (`saved`, its config.json)
    and `config` (train.Config) differ, each as "name: <saved> in the folder, <config's> here". Equal
    values are equal in Python or as JSON (NaN and NaN, a tuple and a list). A setting newer than the
    saved run counts there as its default, which by convention keeps the behaviour from before it."""
    parts = [type(getattr(config, part.name)) for part in fields(config)]
    defaults = {f.name: f.default for cls in parts for f in fields(cls) if f.default is not MISSING}
    current, saved_or_default = config.as_dict(), {**defaults, **saved}
    differences = []
    for name in dict.fromkeys([*saved, *current]):
        was, now = saved_or_default.get(name, "(absent)"), current.get(name, "(absent)")
        if name not in NOT_DEFINING and was != now and json.dumps(was) != json.dumps(now):
            differences.append(f"{name}: {json.dumps(was)} in the folder, {json.dumps(now)} here")
    return differences


def prune_checkpoints(written: Path) -> None:
    """Keep the checkpoint just `written` and the one before it, never `written` itself. Any other
    goes, a later step's too (--resume would take it for this run's latest)."""
    others = sorted(path for path in written.parent.glob("step-??????") if path != written)
    previous = [path for path in others if path.name < written.name][-1:]
    for old in others:
        if old not in previous:
            shutil.rmtree(old, ignore_errors=True)
