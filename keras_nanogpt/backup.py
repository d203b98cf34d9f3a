"""Training backups that survive preemption: a backup at the exact step on SIGTERM/SIGINT, two generations,
and restores that check each backup and fall back to the previous one when it is damaged.

`PreemptibleBackup` is a `fit` callback. Every `save_every` steps, and when SIGTERM or SIGINT arrives
(a spot machine's preemption notice, Ctrl+C), it writes the model's variables (dropout seeds included),
the optimizer's variables and the step into one file, `backup-<step>.npz` (`.npy` arrays and
`manifest.json`), atomically. On a signal it lets the running step finish, writes the backup, prints one
line and exits with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

Restoring checks the newest backup against the model (archive, checksums, variable count, shapes, dtypes,
configuration) before assigning anything; a damaged one is renamed `*.damaged` with a warning, and the
previous generation is used. How this differs from Keras's `BackupAndRestore`: docs/preemption.md.
"""

import atexit
import contextlib
import errno
import glob
import inspect
import io
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
import zipfile

import keras
import numpy as np

from keras_nanogpt import _files, _keras_internals, _torch_random, _validation, backends, distribute

FORMAT = "keras_nanogpt.backup"
VERSION = 1
_NAME = re.compile(r"^backup-(\d+)\.npz$")
_EXIT_GRACE_S = 30  # after the backup on a signal, further signals are ignored this long while the process exits
_MANIFEST = "manifest.json"


class DamagedBackupError(ValueError):
    """Raised when a backup folder holds backups and none of them can be restored."""


class PreemptibleBackup(keras.callbacks.Callback):
    """Back up training every few steps and when SIGTERM/SIGINT arrives; resume at the exact step.

    Resuming needs the same batches from the backed-up step on: make the data a repeated stream,
    skip the steps already trained and give `fit` a fixed `steps_per_epoch` (the first epoch after a
    resume runs only the steps that remained in it). `restore` returns the step to skip to; without it,
    `fit` restores the backup itself when it starts and the data starts where the dataset starts.
    For token shards the step is the data position: `kn.data.token_dataset(..., seed=seed, start=step)`
    continues the stream at that batch without reading the ones before it.

    The backup stays after `fit` ends (it holds the final step, so running the same script again trains
    nothing more): call `delete()` once the model is saved. Under JAX multi-host every process must see the
    same folder (a shared file system); the processes agree on the step before saving, process 0 writes.

    Args:
        directory: the folder of backups (created when needed; hold nothing else there).
        save_every: back up every this many steps, or "epoch" for the end of every epoch.
        keep: backup generations kept (at least 1; 2 keeps the previous one for when the newest is damaged).
        signals: the signals that end training with a backup (one ignored when `fit` starts, as `nohup`
            and background jobs ignore SIGINT, stays ignored).
        exit_on_signal: after the backup on a signal, raise `SystemExit(128 + signal number)` (True) or
            make `fit` return normally (False; `interrupted_by` then names the signal).
        print_fn: where the one line about the backup on a signal goes (default: stderr).

    Example:
        >>> backup = PreemptibleBackup("ckpt", save_every=100)  # doctest: +SKIP
        >>> step = backup.restore(model)                         # 0 when there is no backup yet
        >>> model.fit(train.repeat().skip(step), steps_per_epoch=100, epochs=20, callbacks=[backup])
        >>> model.save("model.keras")
        >>> backup.delete()
    """

    def __init__(self, directory, save_every="epoch", keep=2, signals=(signal.SIGTERM, signal.SIGINT),
                 exit_on_signal=True, print_fn=None):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise TypeError(f"`directory` must be the path of a folder for the backups; got {directory!r}.")
        if save_every != "epoch":
            save_every = _validation.check_int("save_every", save_every)
        self.directory = os.fspath(directory)
        self.save_every = save_every
        self.keep = _validation.check_int("keep", keep)
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.exit_on_signal = bool(exit_on_signal)
        self.print_fn = print_fn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.interrupted_by = None
        self._restored_into = None  # the model `restore` filled, so that fit does not read again
        self._step, self._last_saved = 0, None
        self._epoch_base = self._resumed_in_epoch = self._done_in_epoch = 0
        self._received = None
        self._previous_handlers = {}
        self._fit_code = ()
        self._processes = 1
        self._random_states = {}
        self._exiting_until = 0.0

    # -- restoring ------------------------------------------------------------------------------------

    def restore(self, model):
        """Load the newest good backup into `model` (compiled) and return its step (0 when there is none).

        A backup that cannot be used is renamed `*.damaged` with a warning, and the one before it is tried.

        Raises:
            DamagedBackupError: there are backups and none of them can be used.
        """
        optimizer = _built_optimizer(model)
        variables = list(model.variables) + list(optimizer.variables)
        expected = _describe(model, optimizer, variables)
        damaged, step = [], 0
        for path in _backups(self.directory):
            try:
                manifest, arrays, random_states = read_backup(path)
                _check_matches(manifest, arrays, expected)
            except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile, EOFError) as error:
                damaged.append((path, _reason(error)))
                continue
            for variable, value in zip(variables, arrays):
                variable.assign(value)
            self._random_states = random_states  # set when the first step starts (see on_train_batch_begin)
            step = int(manifest["step"])
            break
        else:
            if damaged:
                listing = "; ".join(f"{path!r}: {reason}" for path, reason in damaged)
                raise DamagedBackupError(
                    f"No backup in {self.directory!r} can be used: {listing}. Remove the folder "
                    f"{self.directory!r} to start training afresh (its backups are lost), or put back a good "
                    f"copy of one of these files.")
        step = distribute.agreed(step, "the step to resume from")
        for path, reason in damaged:
            target = path + ".damaged"
            try:
                if distribute.process_index() == 0:
                    os.replace(path, target)
                aside = f"it is set aside as {target!r}"
            except OSError as error:
                aside = f"it could not be set aside ({error})"
            warnings.warn(f"Backup {path!r} cannot be used ({reason}); {aside} and training resumes from the "
                          f"previous backup (step {step}).", stacklevel=2)
        self._restored_into = model
        self._step = self._last_saved = step
        return step

    def on_train_begin(self, logs=None):
        model = self.model
        if self._restored_into is not model:
            self.restore(model)
        self._restored_into = None  # a later fit reads the folder again
        self.interrupted_by = None
        steps = self.params.get("steps")
        if self._step and not steps:
            raise ValueError(
                "PreemptibleBackup resumes at a step inside an epoch, so it needs the number of steps per "
                "epoch: pass `steps_per_epoch` to fit (or data whose length is known).")
        epoch, self._resumed_in_epoch = divmod(self._step, steps) if self._step else (0, 0)
        _keras_internals.set_initial_epoch(model, epoch)  # what Keras's BackupAndRestore sets too
        self._processes = distribute.process_count()
        self._install_handlers(model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_base = self._step
        self._done_in_epoch, self._resumed_in_epoch = self._resumed_in_epoch, 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._random_states:
            # Only now: making the data iterator draws from torch's generator, which the backed-up run did
            # before the backed-up step.
            _torch_random.set_states(self._random_states)
            self._random_states = {}

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._epoch_base + batch + 1
        if self._stopped_for_signal():
            return
        if self.save_every != "epoch" and self._step // self.save_every > self._last_saved // self.save_every:
            self._save()
        steps = self.params.get("steps")
        if self._done_in_epoch and self._done_in_epoch + batch + 1 >= steps:
            _keras_internals.callback_model(self).stop_training = _END_OF_SHORT_EPOCH  # the resumed epoch ends

    def on_epoch_end(self, epoch, logs=None):
        model = _keras_internals.callback_model(self)
        if model.stop_training is _END_OF_SHORT_EPOCH:
            model.stop_training = False
        if self._stopped_for_signal():  # one that came during validation: no further step
            return
        if self.save_every == "epoch" and self._step != self._last_saved:
            self._save()

    def on_train_end(self, logs=None):
        if self.interrupted_by is None and not self._stopped_for_signal():
            if self._step != self._last_saved:
                self._save()  # the final state, so that a failed model.save loses nothing
        self._uninstall_handlers()
        _keras_internals.set_initial_epoch(_keras_internals.callback_model(self), None)

    def delete(self):
        """Remove the backups (and the folder when nothing else is in it); call it once the model is saved."""
        folder = glob.escape(self.directory)
        for path in glob.glob(os.path.join(folder, "backup-*")) + glob.glob(os.path.join(folder, ".backup-*")):
            if distribute.process_index() == 0 and os.path.exists(path):
                os.remove(path)
        try:
            os.rmdir(self.directory)
        except OSError:
            pass  # something else is in it, or another process removed it

    # -- saving ---------------------------------------------------------------------------------------

    def _save(self):
        model = self.model  # under JAX this puts the training state back into the variables
        optimizer = model.optimizer
        variables = list(model.variables) + list(optimizer.variables)
        arrays = [distribute.host_array(v) for v in variables]  # every process takes part (multi-host gathers)
        path = os.path.join(self.directory, f"backup-{self._step:09d}.npz")
        failure = None
        if distribute.process_index() == 0:
            try:
                write_backup(path, _manifest(self._step, _describe(model, optimizer, variables)), arrays,
                             _torch_random.states())
                self._prune()
            except OSError as error:
                failure = error
        if distribute.agreed(failure is None, "whether the backup was written", reduce=min) is not True:
            raise failure or OSError(errno.EIO, f"Process 0 could not write the backup {path!r}; see its log.")
        self._last_saved = self._step
        return path

    def _prune(self):
        for old in _backups(self.directory)[self.keep:]:
            os.remove(old)

    # -- signals --------------------------------------------------------------------------------------

    def _install_handlers(self, model):
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptibleBackup handles SIGTERM/SIGINT only when fit runs in the main thread; "
                          "here the backups are periodic only.", stacklevel=2)
            return
        self._received = None
        self._fit_code = tuple(inspect.unwrap(cls.__dict__["fit"]).__code__
                               for cls in type(model).__mro__ if "fit" in cls.__dict__)
        for number in self.signals:
            if signal.getsignal(number) != signal.SIG_IGN:  # ignored (nohup, a background job): left so
                self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def _uninstall_handlers(self):
        for number, previous in self._previous_handlers.items():
            if signal.getsignal(number) == self._on_signal:
                signal.signal(number, previous)
        self._previous_handlers = {}

    def _on_signal(self, number, frame):
        """Note the signal; the step (or validation) that is running finishes, then the callback saves and stops.

        Later signals are noted too and change nothing: the backup being written is not interrupted.
        Once `fit` is over (it raised, or a caller caught the SystemExit) the previous handler takes the
        signal, as if this callback had never been there.
        """
        if time.monotonic() < self._exiting_until:
            return  # the backup is written and the process is exiting with 128 + the first signal
        while frame is not None and frame.f_code not in self._fit_code:
            frame = frame.f_back
        if frame is not None:
            if self._received is None:
                self._received = number
            return
        previous = self._previous_handlers.get(number, signal.SIG_DFL)
        self._uninstall_handlers()
        if callable(previous):
            previous(number, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), number)

    def _ignore_signals_while_exiting(self):
        """At interpreter exit, within the grace period: ignore the signals from here on.

        Late in its shutdown Python gives every signal it handled its default action back, so a second
        SIGTERM there would end the process with -15 instead of the 143 it is exiting with. An ignored
        signal keeps being ignored to the end.
        """
        if time.monotonic() < self._exiting_until:
            for number in self.signals:
                signal.signal(number, signal.SIG_IGN)

    def _stopped_for_signal(self):
        """Back up and stop (see `_stop_for_signal`) if a signal came, to any process under multi-host."""
        received = distribute.agreed_signal(self._received) if self._processes > 1 else self._received
        if received is None or self.interrupted_by is not None:
            return False
        self._stop_for_signal(received)
        return True

    def _stop_for_signal(self, number):
        name = signal.Signals(number).name
        path = os.path.join(self.directory, f"backup-{self._step:09d}.npz")
        if self._step != self._last_saved:
            path = self._save()
        self.interrupted_by = name
        self.print_fn(f"{name}: backed up step {self._step} to {path}; the same command resumes from there.")
        model = _keras_internals.callback_model(self)
        _keras_internals.set_initial_epoch(model, None)
        if self.exit_on_signal:
            # The handlers stay, ignoring further signals while the process exits (then they pass them on).
            self._exiting_until = time.monotonic() + _EXIT_GRACE_S
            atexit.unregister(self._ignore_signals_while_exiting)
            atexit.register(self._ignore_signals_while_exiting)
            raise SystemExit(128 + int(number))
        model.stop_training = True
        self._uninstall_handlers()


class _EndOfShortEpoch:
    """The `stop_training` value that ends the first epoch after a resume early and only that epoch."""

    def __bool__(self):
        return True


_END_OF_SHORT_EPOCH = _EndOfShortEpoch()


# -- the file ---------------------------------------------------------------------------------------------

def write_backup(path, manifest, arrays, random_states=None):
    """Write `manifest` (a JSON dict), `arrays` and named random-number states to the archive `path`, atomically.

    Example:
        >>> write_backup("ckpt/backup-000000001.npz", {"format": FORMAT, "version": VERSION, "step": 1,
        ...              "variables": []}, [])  # doctest: +SKIP
    """
    random_states = random_states or {}
    manifest = dict(manifest, random_states=sorted(random_states))
    with _files.atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.writestr(_MANIFEST, json.dumps(manifest))
            members = [(_member(i), a) for i, a in enumerate(arrays)]
            members += [(_random_member(name), random_states[name]) for name in sorted(random_states)]
            for name, array in members:
                if array.dtype.kind == "V":  # bfloat16 and other ml_dtypes types: store the bits
                    array = array.view(f"u{array.dtype.itemsize}")
                with archive.open(name, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array, order="C"), allow_pickle=False)


def read_backup(path):
    """Read the backup archive `path`: `(manifest, arrays, random_states)`, each checked against its checksum.

    Raises:
        ValueError: naming what is wrong (not a backup, truncated, corrupted, an unknown version).

    Example:
        >>> manifest, arrays, random_states = read_backup("ckpt/backup-000000100.npz")  # doctest: +SKIP
        >>> manifest["step"]
        100
    """
    if not zipfile.is_zipfile(path):
        raise ValueError("truncated, or not a backup archive (no zip directory at its end)")
    with zipfile.ZipFile(path) as archive:
        try:
            manifest = json.loads(archive.read(_MANIFEST))
        except KeyError:
            raise ValueError(f"it holds no {_MANIFEST}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"its {_MANIFEST} is not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(f"it is version {manifest.get('version')!r} of the format; this keras_nanogpt "
                             f"reads version {VERSION}")
        arrays = []
        for i, (_, _, dtype) in enumerate(manifest["variables"]):
            array = np.lib.format.read_array(io.BytesIO(archive.read(_member(i))), allow_pickle=False)
            if array.dtype.name != dtype:
                array = array.view(_numpy_dtype(dtype))
            arrays.append(array)
        random_states = {name: np.lib.format.read_array(io.BytesIO(archive.read(_random_member(name))),
                                                        allow_pickle=False)
                         for name in manifest.get("random_states", [])}
    return manifest, arrays, random_states


def _member(i):
    return f"variables/{i:05d}.npy"


def _random_member(name):
    return f"random_states/{name}.npy"


def _numpy_dtype(name):
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16, float8_*: installed with TensorFlow and JAX

        return np.dtype(getattr(ml_dtypes, name))


def _backups(directory):
    """The backup files in `directory`, newest step first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m[1]), name) for name in os.listdir(directory) if (m := _NAME.match(name))]
    return [os.path.join(directory, name) for _, name in sorted(found, reverse=True)]


def _manifest(step, description):
    return {"format": FORMAT, "version": VERSION, "step": int(step), "keras": keras.__version__,
            "backend": backends.name(), **description}


def _describe(model, optimizer, variables):
    """What a backup must match: the model's class and configuration, the optimizer, every variable."""
    try:
        config = {k: v for k, v in model.get_config().items() if k not in ("name", "trainable")}
        config = json.loads(json.dumps(config, default=repr))
    except (NotImplementedError, TypeError):
        config = None
    return {"model": type(model).__name__, "config": config, "optimizer": type(optimizer).__name__,
            "variables": [[v.path, list(v.shape), keras.backend.standardize_dtype(v.dtype)] for v in variables]}


def _check_matches(manifest, arrays, expected):
    """Raise ValueError saying how the backup differs from the model and optimizer it is restored into."""
    for key, what in (("model", "model class"), ("optimizer", "optimizer")):
        if manifest.get(key) != expected[key]:
            raise ValueError(f"it was saved with the {what} {manifest.get(key)}, not {expected[key]}")
    saved, current = manifest.get("config"), expected["config"]
    if saved != current and None not in (saved, current):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        shown = ", ".join(f"{k}={saved.get(k)!r} there, {current.get(k)!r} here" for k in keys[:3]
                          if k != "vectorizer") or "its vectorizer differs"
        raise ValueError(f"it was saved from a different model configuration ({shown})")
    if len(arrays) != len(expected["variables"]):
        raise ValueError(f"it holds {len(arrays)} variables; the model and optimizer have "
                         f"{len(expected['variables'])}")
    for array, (path, shape, dtype) in zip(arrays, expected["variables"]):
        if list(array.shape) != shape or array.dtype.name != dtype:
            raise ValueError(f"{path} is {array.dtype.name} {tuple(array.shape)} there but {dtype} "
                             f"{tuple(shape)} here")


def _reason(error):
    if isinstance(error, zipfile.BadZipFile):
        return f"corrupted: {error}"
    if isinstance(error, (KeyError, EOFError)):
        return f"incomplete: {error!r}"
    return str(error) or type(error).__name__


def _built_optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError("PreemptibleBackup needs a compiled model (its optimizer's state is backed up too); "
                         "call model.compile() first.")
    if not optimizer.built:
        strategy = distribute.model_strategy(model)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
    return optimizer
