"""One run: ``python run.py {fit,validate,test,predict} --config configs/<experiment>.yaml``.

A LightningCLI over any LightningModule / LightningDataModule of this suite. ``configs/base.yaml``
(trainer, logger, checkpointing) is always loaded first; experiment configs hold overrides only.
The datamodule's class count, class names, task, channels and image size are linked into the
model at instantiation. ``--ckpt_path last|best`` means this run's own checkpoint (the newest
``runs/<name>/version_N`` that has it), and test/validate/predict default to ``best``.
``--ckpt_path auto`` resumes from ``last`` when the run has one and starts fresh otherwise (for
pre-emptible and requeued cluster jobs).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

ROOT = Path(__file__).resolve().parent
BASE_CONFIG = ROOT / "configs" / "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
OUR_PACKAGES = ("lightning_modules", "datamodules", "peft_methods", "benchmarks", "run", "sweep")
log = logging.getLogger("medpeft")


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config into the run dir: ``config.yaml`` for fit, ``config_<stage>.yaml`` else.

    Its checkpoint state records the precision the run started in (kept across resumes, also where a
    resume had to train in another one; ``choose_precision`` reads it) and, for the record, the one it
    trained in last. A checkpoint written before this record existed has none: its first resume
    records the resume's precision as the start.
    """

    @property
    def state_key(self) -> str:
        from lightning_modules.precision import RECORD_KEY

        return RECORD_KEY

    precision_started: str | None = None  # restored from the checkpoint a fit resumes
    precision_trained: str | None = None  # this fit's

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn enum
        self.config_filename = "config.yaml" if stage == "fit" else f"config_{stage}.yaml"
        self.precision_trained = str(trainer.precision)
        super().setup(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return {"precision_started": self.precision_started or self.precision_trained,
                "precision_trained": self.precision_trained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.precision_started = state_dict.get("precision_started")


class MedPeftCLI(LightningCLI):
    """LightningCLI with data->model links and run-aware checkpoint resolution."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        links = {
            "num_classes": "num_classes",
            "class_names": "class_names",
            "task": "task",
            "channels": "input_channels",
            "image_size": "image_size",
        }
        for source, target in links.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        init = _tensorboard_args(cfg)
        if init is not None and self.subcommand == "fit":
            check_writable(Path(init.save_dir))
        self._resolve_checkpoint(cfg, init)
        choose_precision(cfg.trainer, cfg.get("ckpt_path") if self.subcommand == "fit" else None)

    def _resolve_checkpoint(self, cfg: Any, init: Any) -> None:
        """``--ckpt_path last|best|auto`` (and the evaluation default ``best``) become this run's own file."""
        ckpt = cfg.get("ckpt_path")
        if self.subcommand in ("validate", "test", "predict") and ckpt is None:
            ckpt = "best"
        if ckpt not in ("last", "best", "auto"):
            return
        if init is None:
            raise ValueError(
                f"--ckpt_path {ckpt} needs the TensorBoardLogger of configs/base.yaml to find this run; "
                "pass --ckpt_path <path/to/file.ckpt> instead."
            )
        name = "last" if ckpt == "auto" else ckpt
        try:
            run = find_run(Path(init.save_dir), init.name, init.get("version"), f"{name}.ckpt")
        except FileNotFoundError:
            if ckpt != "auto":
                raise
            cfg.ckpt_path = None  # auto: first start of a (re)queued job trains from scratch
            print(f"No checkpoint of run '{init.name}' yet: starting a new run.", file=sys.stderr)
            return
        cfg.ckpt_path = str(run / "checkpoints" / f"{name}.ckpt")
        version = run.name.removeprefix("version_")
        init.version = int(version) if version.isdigit() else run.name
        print(f"Using {name} checkpoint of this run: {cfg.ckpt_path}", file=sys.stderr)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            discard_unfinished_run(self.trainer, subcommand)
            raise


def choose_precision(trainer: Any, ckpt: Any = None) -> None:
    """``trainer.precision: null`` becomes the fastest safe precision of the device (and says so).

    A fit resumed from checkpoint ``ckpt`` keeps the precision its run started in (recorded in the
    checkpoint) where this device computes it natively, so that one run does not change numerics
    half-way; elsewhere it takes the device's choice and warns, as it does when an explicit
    precision differs from the run's.
    """
    from lightning_modules.precision import (
        auto_precision,
        emulates,
        is_checkpoint_file,
        recorded_precision,
        resolve_device,
        runs_natively,
        slow_precision_warning,
        unified,
    )

    device = resolve_device(trainer.get("accelerator"))
    strategy = trainer.get("strategy")
    started = recorded_precision(ckpt) if ckpt is not None else None
    if trainer.get("precision") is None:
        if started is not None and runs_natively(started, device, strategy):
            trainer.precision = started
            print(f"trainer.precision: {started} (the run of {ckpt} started in it; set --trainer.precision "
                  "to choose).", file=sys.stderr)
            return
        trainer.precision, why = auto_precision(device, strategy)
        if started is not None:
            keep = (f"set --trainer.precision {started} to keep it, emulated and slower" if emulates(started, device)
                    else "resume on a device that computes it to keep it")
            log.warning(
                f"trainer.precision: {trainer.precision} ({why}), although the run of {ckpt} started in "
                f"{started}, which this {device.upper()} does not compute natively; {keep}."
            )
            return
        note = f"; {ckpt} records no precision" if ckpt is not None and is_checkpoint_file(ckpt) else ""
        print(f"trainer.precision: {trainer.precision} ({why}{note}; set --trainer.precision to choose).",
              file=sys.stderr)
        return
    if started is not None and unified(trainer.precision) != started:
        null = " (or null)" if runs_natively(started, device, strategy) else ""
        log.warning(
            f"trainer.precision={trainer.precision} differs from the {started} the run of {ckpt} started in, "
            f"so its resumed steps train in another precision; pass --trainer.precision {started}{null} "
            "to continue in the run's."
        )
    if (warning := slow_precision_warning(trainer.precision, device)) is not None:
        log.warning(warning)


def _tensorboard_args(cfg: Any) -> Any:
    """The TensorBoardLogger's init_args in a subcommand config, or None for another logger."""
    logger = cfg.trainer.get("logger")
    if "TensorBoardLogger" not in str(getattr(logger, "class_path", "")):
        return None
    return getattr(logger, "init_args", None)


def check_writable(directory: Path) -> None:
    """Fails before any training when the output directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise PermissionError(
            f"Output directory {directory} (trainer.logger.init_args.save_dir) is not writable "
            f"({err.strerror}); choose a writable folder with --trainer.logger.init_args.save_dir."
        ) from err


def find_run(save_dir: Path, name: str, version: Any, filename: str) -> Path:
    """The run dir holding ``checkpoints/<filename>``: the given version, else the newest one."""
    base = save_dir / name
    if version is not None:
        run = base / (version if isinstance(version, str) else f"version_{version}")
        candidates = [run] if (run / "checkpoints" / filename).is_file() else []
    else:
        runs = [p for p in base.glob("version_*") if (p / "checkpoints" / filename).is_file()]
        candidates = sorted(runs, key=lambda p: (len(p.name), p.name))
    if not candidates:
        raise FileNotFoundError(
            f"No checkpoints/{filename} found for run '{name}' under {base}: train it first with "
            f"'python run.py fit' using the same config, or pass --ckpt_path <path/to/file.ckpt>."
        )
    return candidates[-1]


def discard_unfinished_run(trainer: L.Trainer | None, subcommand: str) -> None:
    """A fit that failed before writing any checkpoint leaves no run dir claiming a result."""
    if subcommand != "fit" or trainer is None or not trainer.is_global_zero:
        return
    from lightning_modules.results import run_dir

    log_dir = run_dir(trainer)  # not trainer.log_dir: a collective that would hang other ranks
    if trainer.loggers and log_dir.is_dir() and not any(log_dir.rglob("*.ckpt")):
        shutil.rmtree(log_dir, ignore_errors=True)


def cli_main(args: list[str] | None = None) -> MedPeftCLI:
    """Runs one subcommand (fit / validate / test / predict) with ``configs/base.yaml`` first."""
    # Parse errors raise (exit_on_error=False) so main() can end them with one clear line.
    defaults = {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False}
    return MedPeftCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, **{sub: dict(defaults) for sub in SUBCOMMANDS}},
        auto_configure_optimizers=False,
        args=args,
    )


def user_error(err: BaseException) -> BaseException | None:
    """The innermost exception in ``err``'s chain that our own code raised on purpose, if any.

    LightningCLI wraps constructor errors in long parser dumps; the sentence we wrote for the
    user is the root of that chain.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for exc in reversed(chain):
        if not isinstance(exc, (ValueError, OSError, FloatingPointError, LookupError)):
            continue
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and _is_ours(frames[-1].filename):
            return exc
    return None


def _is_ours(filename: str) -> bool:
    path = Path(filename).resolve()
    try:
        rel = path.relative_to(ROOT)
    except ValueError:
        return False
    return rel.parts[0].removesuffix(".py") in OUR_PACKAGES


def parse_error_message(err: BaseException) -> str:
    """One sentence from a jsonargparse error: the full option key and its innermost complaint."""
    text = str(err)
    keys = re.findall(r'Parser key "([^"]+)"', text)
    where = f" for '{'.init_args.'.join(keys)}'" if keys else ""
    lines = [ln.strip() for ln in text.splitlines()]
    detail = ""
    for i, line in enumerate(lines):  # the innermost class that could not be imported wins
        found = re.match(r"- Problem with given class_path '([^']+)':", line)
        if found and i + 1 < len(lines) and not lines[i + 1].startswith("Parser key"):
            detail = f"cannot use '{found.group(1)}' ({lines[i + 1]})"
    if not detail:
        noise = ("Parser key", "- Problem with given class_path", "Does not validate", "Subtypes", "Errors:",
                 "Given value", "- Expected a <class 'NoneType'>", "- Expected a path but")
        useful = [ln.lstrip("- ") for ln in lines if ln and not ln.startswith(noise)]
        detail = useful[-1] if useful else text.strip()
    return (
        f"Invalid configuration{where}: {detail.rstrip('.')}. Check the option's spelling and value "
        "(python run.py fit --help lists them)."
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: our user-facing errors end the output as one line, exit code 1."""
    from lightning_modules.allocator import keep_freed_memory
    from lightning_modules.resume import Preempted

    keep_freed_memory()  # before the first step: freed activations stay in the process
    try:
        cli_main(argv)
    except Preempted as stop:  # a clean stop with a checkpoint: say where, after everything else
        if stop.message:
            print(f"\n{stop.message}", file=sys.stderr, flush=True)
        return int(stop.code)
    except ArgumentError as err:
        print(f"error: {parse_error_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - filtered below; bugs keep their traceback
        if isinstance(err, TypeError) and "Parser key" in str(err):  # a value of the wrong type
            print(f"error: {parse_error_message(err)}", file=sys.stderr)
            return 2
        found = user_error(err)
        if found is None or os.environ.get("MEDPEFT_DEBUG"):
            raise
        print(f"error: {found}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # DDP re-launches this script: keep the guard
    sys.exit(main())
