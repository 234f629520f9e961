"""The training steps as events for the driver's progress bar (console.WorkerEvents): the
phase line when training starts or resumes, one event per optimizer step with the last
logged loss, a note per checkpoint, and the fine-tuned scoring phase at the last step.

The callback goes first in the trainer's callback list: at the last step it announces the
scoring that the report callback (train/trainer.py) then does. It reports from rank 0 only
(the worker passes disabled events elsewhere). transformers is imported inside
`progress_callback` (Unsloth must come first in a GPU worker).
"""

from __future__ import annotations

from sentiment_ray.terminal.console import WorkerEvents


def progress_callback(events: WorkerEvents, *, checkpoint_every: int, validation_rows: int, eval_steps: int = 0):
    """A transformers TrainerCallback that reports the steps through `events`."""
    from transformers import TrainerCallback

    class _ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.loss = None
            self.total = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.total = state.max_steps
            start = state.global_step
            every = f", a checkpoint every {checkpoint_every}" if 0 < checkpoint_every < self.total else ""
            if start >= self.total:
                events.phase(f"training: all {self.total} steps were done before (checkpoint at step {start})")
                return control
            if start:
                events.phase(f"training steps {start + 1}-{self.total} (resuming from the checkpoint at step {start}{every})")
            else:
                events.phase(f"training {self.total} steps{every}")
            events.progress_start(self.total, start)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                if state.global_step < self.total:
                    events.step(state.global_step, self.total, self.loss)
            return control

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            logged_now = args.logging_steps and step % int(args.logging_steps) == 0
            if step >= self.total:
                events.step(step, self.total, self.loss, force=True)
                events.progress_end()
                if validation_rows:
                    events.phase(f"fine-tuned scoring {validation_rows} validation rows")
            elif not logged_now:
                events.step(step, self.total, self.loss)
            if validation_rows and eval_steps and step % eval_steps == 0 and step < self.total:
                events.note(f"scoring {validation_rows} validation rows at step {step}")
            return control

        def on_save(self, args, state, control, **kwargs):
            events.emit("checkpoint", step=state.global_step)
            return control

    return _ProgressCallback()
