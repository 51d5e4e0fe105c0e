"""Callbacks that break a run at a chosen step: StopAtStep stops it as SIGTERM does (Lightning raises
SIGTERMException after the step), a kill at a known point for the resume tests; PoisonAtStep makes
it diverge there."""

from lightning import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SIGTERMException


class PoisonAtStep(Callback):
    """Sets every trainable weight to NaN before training step `step`: a run that diverges there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                if p.requires_grad:
                    p.data.fill_(float("nan"))
