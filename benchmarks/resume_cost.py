"""What preemption safety costs at nanoGPT's shakespeare_char CPU config, printing JSON.

In one process (the backend from KERAS_BACKEND) it measures, side by side in alternating bursts:
- ms per training step with and without `kn.backup.PreemptibleBackup` (no backup written in the bursts),
- ms to write one backup (`_save`, what every `--checkpoint-every` and a signal cost) and its size,
- ms to restore it (`restore`: read, check, assign),
- ms per batch that resuming skips: `keras-nanogpt train` resumes at step k by `train.repeat().skip(k)` on its
  random-window pipeline, so the same batches come next; compared with a training step.

    KERAS_BACKEND=tensorflow python benchmarks/resume_cost.py
    KERAS_BACKEND=jax python benchmarks/resume_cost.py --skips 1000,5000 --bursts 3
"""

import json
import os
import shutil
import tempfile
import time

import _common
import keras

import keras_nanogpt as kn


class _StepTimer(keras.callbacks.Callback):
    """ms per step from the start of training to the end of its last step (fit's own set-up and end left out)."""

    def on_train_begin(self, logs=None):
        self.steps, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        self.ms_per_step = (time.perf_counter() - self.start) * 1000 / self.steps


def main():
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--config", default="nano")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed burst")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--skips", default="1000,5000", help="batches skipped, comma-separated")
    args = parser.parse_args()
    report = {"backend": keras.backend.backend(), "config": args.config, "batch_size": args.batch_size,
              **_common.machine()}
    keras.utils.set_random_seed(1337)
    text = kn.data.load_text("tinyshakespeare")
    vectorizer = kn.data.make_vectorizer(text)
    model = kn.NanoGPT.from_config_name(args.config, vocabulary_size=vectorizer.vocabulary_size())
    train, _ = kn.data.make_datasets(text, vectorizer, model.sequence_length, args.batch_size,
                                     sampling="random", seed=1337)
    model.compile(optimizer=kn.training.nanogpt_optimizer(10_000))
    folder = tempfile.mkdtemp(prefix="resume_cost_")
    try:
        data = train.repeat()
        model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)  # compile
        timings = {"without": [], "with": []}
        for burst in range(args.bursts):
            for name in timings:
                # A fresh folder each time, so that no burst resumes; the backup written when fit ends is
                # outside the timed steps.
                backup = kn.backup.PreemptibleBackup(os.path.join(folder, f"{name}{burst}"), save_every=10**9)
                timer = _StepTimer()
                model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0,
                          callbacks=[backup, timer] if name == "with" else [timer])
                timings[name].append(timer.ms_per_step)
        step_ms = min(timings["without"])
        report["ms_per_step"] = {name: round(min(values), 2) for name, values in timings.items()}
        report["backup_callback_overhead"] = round(min(timings["with"]) / step_ms - 1, 4)

        backup = kn.backup.PreemptibleBackup(os.path.join(folder, "written"))
        backup.set_model(model)
        writes = []
        for _ in range(args.bursts):
            start = time.perf_counter()
            path = backup._save()
            writes.append((time.perf_counter() - start) * 1000)
            backup._step += 1
        report["backup_write_ms"] = round(min(writes), 1)
        report["backup_megabytes"] = round(os.path.getsize(path) / 1e6, 2)
        start = time.perf_counter()
        kn.backup.PreemptibleBackup(os.path.join(folder, "written")).restore(model)
        report["restore_ms"] = round((time.perf_counter() - start) * 1000, 1)

        def first_batch_ms(skip):
            start = time.perf_counter()
            next(iter(train.repeat().skip(skip)))
            return (time.perf_counter() - start) * 1000

        skips = [int(s) for s in args.skips.split(",")]
        base = min(first_batch_ms(0) for _ in range(args.bursts))
        per_batch = {s: round((min(first_batch_ms(s) for _ in range(args.bursts)) - base) / s, 4) for s in skips}
        report["skip_ms_per_batch"] = per_batch
        report["skip_over_step"] = {s: round(ms / step_ms, 4) for s, ms in per_batch.items()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["load_average_at_end"] = _common.load_average()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
