"""``python -m dms_lightning fit|validate|test|predict --config ...``: the LightningCLI of dms_lightning."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from dms_lightning.data.datamodule import DMSDataModule
from dms_lightning.export.sdk import SDKToolError
from dms_lightning.models.classifier import ClassificationModule
from dms_lightning.predict import PredictionWriter
from dms_lightning.utils.checkpoint import load_checkpoint
from dms_lightning.utils.io import ensure_writable_dir, make_room_for_run

DEBUG_ENV = "DMS_LIGHTNING_DEBUG"
# ckpt_path values Lightning resolves itself: not files to check here.
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class FinalLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` holds the end of *every* epoch, the weights the exporters write.

    Since Lightning 2.5, ``save_last=True`` writes ``last.ckpt`` only in a step that also saved a top-k
    checkpoint, so with ``monitor: val/acc, save_top_k: 1`` it was a copy of the best epoch: reloading it
    gave other weights than the run's final (and exported) network. This restores "last = the latest".
    """

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer) -> None:
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer) \
                and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class DMSLightningCLI(LightningCLI):
    """LightningCLI with the data module's classes, channels and image size linked into the model.

    ``data.num_classes``, ``data.class_names``, ``data.channels``, ``data.image_size`` and
    ``data.class_weights`` (``data.balance: loss_weights``) are known only
    once the data module has looked at its source, so they are linked on instantiation: point
    ``data.data_dir`` at a new folder of classes and the model follows with no other change. A
    ``checkpoint`` section configures the ModelCheckpoint (best ``val/acc`` and ``last``); TensorBoard is
    the default logger under ``runs/``; ``predict`` writes ``predictions.csv`` to the log directory.

    Before anything trains:

    * a ``ckpt_path`` is read with the package's safe loader (a truncated file is named in the error) and
      its classes and input channels are compared with the data's;
    * ``fit`` (not resuming) keeps an earlier run's files: every output folder named in the config
      (``checkpoint.dirpath``, a callback's ``dirpath`` / ``output_dir``) that already holds files is
      renamed to ``<folder>-v<N>`` so the new run starts clean and the fixed paths hold the latest run;
      ``overwrite: true`` deletes the earlier run's files instead;
    * the log folder is checked to be writable.

    Errors of the configuration are raised as they are (``argparse.ArgumentError`` for values the parser
    refuses); :func:`console_main` prints them in one line.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", ClassificationModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", DMSDataModule)
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Raise parse errors instead of printing the whole usage and exiting: console_main shows one line.
        kwargs["parser_kwargs"] = {"exit_on_error": False, **kwargs.get("parser_kwargs", {})}
        self._default_lr_monitor = LearningRateMonitor(logging_interval="epoch")
        defaults = {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "runs", "name": "dms"}},
                    "callbacks": [self._default_lr_monitor],
                    "log_every_n_steps": 10}
        given = dict(kwargs.get("trainer_defaults", {}))
        # Callbacks given here (a list or one, as LightningCLI takes them) join the default ones, after the config's.
        extra = given.pop("callbacks", [])
        defaults["callbacks"] += extra if isinstance(extra, list) else [extra]
        kwargs["trainer_defaults"] = {**defaults, **given}
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FinalLastCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:02d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: delete an earlier run's files in the output folders instead of keeping "
                                 "them as <folder>-v<N>")
        for source, target in (("num_classes", "num_classes"), ("class_names", "class_names"),
                               ("channels", "in_channels"), ("image_size", "image_size"),
                               ("class_weights", "class_weights")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    @override
    def before_instantiate_classes(self) -> None:
        self._route_model_class_weights()

    def _route_model_class_weights(self) -> None:
        """``model.class_weights`` given on the command line or in a config reaches the model.

        The model's class weights are linked from ``data.class_weights`` (so ``data.balance: loss_weights`` can
        compute them), and a link overwrites its target: a value given for the model was silently replaced by
        the data's ``None``. It is moved to ``data.class_weights``, which the link carries to the model.
        """
        config = self._subcommand_config()
        init_args, data = config.get("model.init_args"), config.get("data")
        weights = init_args.get("class_weights") if init_args is not None else None
        if weights is None or data is None:
            return
        if data.get("class_weights") is not None or data.get("balance") == "loss_weights":
            given = ("data.class_weights=" + repr(data.get("class_weights")) if data.get("class_weights") is not None
                     else "data.balance='loss_weights'")
            raise ValueError(f"model.class_weights={list(weights)!r} and {given} both set the loss's class weights; "
                             "give one of them (data.class_weights takes a list or {class name: weight})")
        data["class_weights"] = list(weights)
        init_args["class_weights"] = None

    @override
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.logger is None:  # `--trainer.logger=false`: the default monitor would refuse to start
            trainer.callbacks = [c for c in trainer.callbacks if c is not self._default_lr_monitor]
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())
        return trainer

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here with a bare torch.load: read it with the
        # package's loader first, so a truncated or foreign file is named in the error.
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path and str(ckpt_path) not in _CKPT_KEYWORDS and Path(ckpt_path).is_file():
            load_checkpoint(ckpt_path, "ckpt_path")
        super()._parse_ckpt_path()

    # ------------------------------------------------------------------------------- checks before running
    def _subcommand_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def _ckpt_path(self) -> str | None:
        path = self._subcommand_config().get("ckpt_path")
        return None if path is None or str(path) in _CKPT_KEYWORDS else str(path)

    def check_checkpoint(self) -> None:
        """Read ``ckpt_path`` safely and compare its classes and input channels with the data's."""
        path = self._ckpt_path()
        if path is None:
            return
        checkpoint = load_checkpoint(path, "ckpt_path")
        hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        data = self.datamodule
        where = f"ckpt_path={path!r}"
        num_classes, class_names = hparams.get("num_classes"), hparams.get("class_names")
        if data is None:
            return
        if num_classes is not None and num_classes != data.num_classes:
            raise ValueError(f"{where} was trained for {num_classes} classes {class_names or ''} but the data has "
                             f"{data.num_classes} classes {list(data.class_names)}. Use the data the model was "
                             "trained on (data.source / data.data_dir / data.manifest), or a checkpoint trained "
                             "for these classes")
        if class_names is not None and list(class_names) != list(data.class_names):
            raise ValueError(f"{where} was trained for classes {list(class_names)} but the data has classes "
                             f"{list(data.class_names)} (names and order must match: predictions would be "
                             "labelled with the wrong class)")
        in_channels = hparams.get("in_channels")
        if in_channels is not None and in_channels != data.channels:
            raise ValueError(f"{where} was trained on {in_channels}-channel images but data.channels="
                             f"{data.channels}; set data.channels: {in_channels}")

    def check_log_folder(self) -> None:
        for logger in self.trainer.loggers:
            folder = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
            if folder and rank_zero_only.rank == 0:
                ensure_writable_dir(folder, "trainer.logger.init_args.save_dir")

    def output_folders(self) -> list[Path]:
        """The folders the run writes to by name (callbacks' ``dirpath`` / ``output_dir``), outermost only."""
        found = []
        for callback in self.trainer.callbacks:
            for attribute in ("dirpath", "output_dir"):
                value = getattr(callback, attribute, None)
                if isinstance(value, (str, Path)) and str(value):
                    found.append(Path(value).expanduser().resolve())
        found = sorted(set(found), key=lambda p: len(p.parts))
        outer: list[Path] = []
        for folder in found:
            if not any(folder.is_relative_to(o) for o in outer):
                outer.append(folder)
        return outer

    def input_paths(self) -> list[Path]:
        """Files and folders the run reads (checkpoints, weights, baseline ONNX files, the data)."""
        values: list = []
        for hparams in (getattr(self.model, "hparams", {}), getattr(self.datamodule, "hparams", {})):
            values += list(hparams.values())
        for callback in self.trainer.callbacks:
            values += [getattr(v, "onnx_path", None) for v in getattr(callback, "extra_variants", None) or []]
        values.append(self._ckpt_path())
        paths = []
        for value in values:
            if isinstance(value, (str, Path)) and str(value) and Path(value).expanduser().exists():
                paths.append(Path(value).expanduser().resolve())
        return paths

    def keep_earlier_runs(self, overwrite: bool) -> None:
        """Move (or with ``overwrite`` delete) what an earlier run left in this run's output folders."""
        if rank_zero_only.rank != 0:
            return
        inputs = self.input_paths()
        for folder in self.output_folders():
            read = [p for p in inputs if p.is_relative_to(folder)]
            if read:
                rank_zero_warn(f"[dms_lightning] {folder} holds an input of this run ({read[0]}), so an earlier "
                               "run's files there are replaced one by one, not kept as a version")
                continue
            moved = make_room_for_run(folder, overwrite=overwrite, field="output folder")
            if moved is not None:
                rank_zero_info(f"[dms_lightning] {folder} held an earlier run: moved to {moved} "
                               "(set `overwrite: true` to delete it instead)")
            elif overwrite:
                rank_zero_info(f"[dms_lightning] {folder}: an earlier run's files, if any, were deleted "
                               "(overwrite: true)")

    def before_fit(self) -> None:
        self.check_checkpoint()
        self.check_log_folder()
        if self._ckpt_path() is None:  # resuming continues the earlier run in its own folders
            self.keep_earlier_runs(bool(self._subcommand_config().get("overwrite", False)))

    def before_validate(self) -> None:
        self.check_checkpoint()

    def before_test(self) -> None:
        self.check_checkpoint()

    def before_predict(self) -> None:
        self.check_checkpoint()


class _Parsed(Exception):
    """Stops :class:`_ParseOnlyCLI` once the command line is parsed and checked."""


class _ParseOnlyCLI(DMSLightningCLI):
    @override
    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        raise _Parsed


def check_arguments(args: list[str]) -> None:
    """Parse ``args`` (``["fit", "--config", ...]``) as :func:`main` would and raise what it refuses, building and
    running nothing.

    For a run that starts later (the student stage of ``python -m dms_lightning pipeline``): an unknown key, a value
    of the wrong type or a missing config file is reported before an earlier stage spends minutes training.
    Checks that need the classes built (a callback's value ranges, the data folder) are left to the run itself.
    """
    try:
        _ParseOnlyCLI(args=args)
    except _Parsed:
        return


def main(args=None) -> DMSLightningCLI:
    if args is not None and list(args) == sys.argv[1:]:
        args = None  # the command line itself: LightningCLI reads sys.argv (and DDP relaunches it)
    return DMSLightningCLI(args=args)


# ----------------------------------------------------------------------------------------- console errors
#: Exceptions that describe a problem with the user's config, files or data: shown as one message.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MisconfigurationException, argparse.ArgumentError,
                                                SDKToolError)
_WRAPPER_MARKERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path",
                    "Parser key ")
_NOISE_PREFIXES = ("Subtypes:", "Given value type:", "Given value:", "Errors:",
                   "Does not validate against any of the Union subtypes", "- Expected a <class 'NoneType'>")


def _raised_in_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "jsonargparse" in last.tb_frame.f_code.co_filename


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and all(err is not s for s in seen):
        seen.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return seen


def _clean_parser_message(text: str) -> str:
    """jsonargparse's union report without the subtype list, the value dump and repeated alternatives."""
    head, blocks = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(_NOISE_PREFIXES):
            continue
        if stripped.startswith("- "):
            blocks.append([stripped[2:]])
        elif blocks:
            blocks[-1].append(stripped)
        else:
            head.append(stripped)
    kept, details = [], set()
    for block in blocks:
        detail = " ".join(block[1:]) or block[0]
        if "'lightning.Callback'" in block[0] or detail in details:
            continue  # the base-class alternative repeats the real one
        details.add(detail)
        kept.append(" ".join(block))
    message = " ".join(head + kept)
    if "Parser key \"trainer.callbacks\"" in message:
        message += (". A --trainer.callbacks.init_args.<name> override goes to the last callback of the list; "
                    "change a value of another callback in the config file")
    return message


def user_error(err: BaseException) -> tuple[BaseException, str] | None:
    """The innermost meaningful error of a config/data problem and its message; None for a bug.

    jsonargparse wraps an exception raised while instantiating a class into a "Union subtypes" report;
    the first exception of the chain raised outside jsonargparse is the one that names the field, the
    value and what is valid. A value the parser itself refuses has no such exception: its report is
    shortened instead.
    """
    chain = _chain(err)
    for candidate in chain:
        if _raised_in_jsonargparse(candidate) or str(candidate).startswith(_WRAPPER_MARKERS):
            continue
        if not isinstance(candidate, USER_ERRORS):
            return None
        return candidate, str(candidate)
    top = chain[0]
    if isinstance(top, USER_ERRORS):
        return top, _clean_parser_message(str(top))
    return None


def debug_requested(argv: Iterable[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def console_main(run: Callable[[list[str]], object] = main, argv: list[str] | None = None) -> int:
    """Run ``run(argv)``; print a user error as one message (traceback with ``--debug`` / ``DMS_LIGHTNING_DEBUG=1``).

    Returns the exit code: 0, 1 for an error of the run, 2 for a value the parser refuses.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if from_command_line else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if from_command_line:
        sys.argv[1:] = argv
    try:
        run(argv)
    except Exception as err:  # noqa: BLE001 - every error reaches the user, bugs with their traceback
        found = None if debug else user_error(err)
        if found is None:
            traceback.print_exc()
            return 1
        cause, message = found
        print(f"error: {message}", file=sys.stderr)
        print(f"({type(cause).__name__}; for the full traceback add --debug or set {DEBUG_ENV}=1)", file=sys.stderr)
        return 2 if isinstance(cause, argparse.ArgumentError) else 1
    return 0


__all__ = ["DMSLightningCLI", "main", "console_main", "TensorBoardLogger"]
