"""A ``transformers.TrainerCallback`` that watches ordinary-text perplexity through a :class:`FrozenText`."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from reserved_kernels.models.evaluation.frozen_text import FrozenText

logger = logging.getLogger(__name__)


class PerplexityCallback(TrainerCallback):
    """Log ordinary-text perplexity while the rows train, and stop training when it grows too much.

    At the start of training and every ``every_n_steps`` optimizer steps it evaluates ``frozen.perplexity()`` (exact,
    O(K·D) a token: no forward pass) and asks the Trainer to log: ``ordinary_perplexity`` and
    ``ordinary_perplexity_change`` (the relative change since the start) join that log line, so the console,
    ``trainer.state.log_history`` and the reporting integrations (TensorBoard, W&B) get them. With ``max_increase``
    (a fraction: 0.01 is +1%), training stops, with a warning, once the change passes it; ``stopped`` then says why.

    Reporting integrations run their ``on_log`` in the order the callbacks were added; the Trainer adds its own
    reporters first, so use :meth:`attach` (which puts this callback ahead of them) rather than ``callbacks=[...]``
    when TensorBoard or W&B should record the metric.
    """

    def __init__(self, frozen: FrozenText, *, every_n_steps: int = 1, max_increase: float | None = None) -> None:
        if not isinstance(frozen, FrozenText):
            raise TypeError(f"frozen must be a FrozenText, got {type(frozen).__name__}")
        if not (isinstance(every_n_steps, int) and every_n_steps >= 1):
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if max_increase is not None and not max_increase > 0:
            raise ValueError(f"max_increase must be > 0 (a fraction: 0.01 is +1%), got {max_increase!r}")
        self.frozen, self.every_n_steps, self.max_increase = frozen, every_n_steps, max_increase
        self.start: float | None = None
        self.history: list[tuple[int, float]] = []  # (global step, perplexity)
        self.stopped: str | None = None
        self._pending: dict[str, float] = {}

    def attach(self, trainer) -> PerplexityCallback:
        """Add this callback to ``trainer`` ahead of its reporting integrations; returns it."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def _measure(self, step: int, control) -> None:
        value = self.frozen.perplexity()
        if self.start is None:
            self.start = value
        change = value / self.start - 1
        self.history.append((step, value))
        self._pending = {"ordinary_perplexity": value, "ordinary_perplexity_change": change}
        control.should_log = True
        if self.max_increase is not None and change > self.max_increase:
            self.stopped = (f"ordinary-text perplexity rose {100 * change:.2f}% (from {self.start:.4f} to {value:.4f} "
                            f"at step {step}), past max_increase={100 * self.max_increase:g}%")
            logger.warning("PerplexityCallback stops training: %s", self.stopped)
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.history, self.stopped = None, [], None
        self._measure(state.global_step, control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._measure(state.global_step, control)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history:  # the Trainer copied the line into its history before the callbacks ran
                state.log_history[-1].update(self._pending)
            self._pending = {}
        return control
