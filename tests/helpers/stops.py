"""A callback that stops a run as SIGTERM does (Lightning raises SIGTERMException after the step),
at a chosen step: a kill at a known point, for the resume tests."""

from lightning import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SIGTERMException
