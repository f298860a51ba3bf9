"""TensorBoard logging of a training run: each epoch's scalars (losses, mIoU, IoU per class, learning rate) and a
picture of the val images the model gets most wrong (image | truth | prediction). Training goes on without it where
TensorBoard does not import."""
import math
from pathlib import Path

import numpy as np

import visualize
from errors import warn


class TensorBoardLog:
    def __init__(self, exp_dir: Path, num_classes: int, dataset):
        self.exp_dir, self.num_classes, self.dataset = Path(exp_dir), num_classes, dataset  # the main val set
        self.writer = None

    def open(self, first_epoch: int) -> None:
        """The event writer; events of epochs from first_epoch on, left by an earlier run, are dropped. Slow to
        import: call it off the training thread."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # noqa: BLE001 -- broken installs raise ImportError, TypeError, AttributeError
            warn(f"TensorBoard logging is off ({type(e).__name__}: {str(e).strip()[:100]}); metrics.csv still gets "
                 "every epoch. To have it: pip install -U tensorboard")
            return
        self.writer = SummaryWriter(str(self.exp_dir), purge_step=first_epoch)

    def log(self, rows: list[dict], worst: list | None) -> None:
        """Scalars of each row's epoch; the worst val samples' picture, (index, IoU, classes) each, at the last."""
        w = self.writer
        if w is None:
            return
        for row in rows:
            for key, value in row.items():
                if key == "epoch" or value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                group = "iou" if key.startswith("iou_") else "loss" if key.endswith("loss") else "metrics"
                w.add_scalar(f"{group}/{key}", value, row["epoch"])
        if worst:
            w.add_image("val/worst", self.worst_grid(worst), rows[-1]["epoch"], dataformats="HWC")
        w.flush()

    def worst_grid(self, worst: list[tuple[int, float, np.ndarray]]) -> np.ndarray:
        """Image | truth | prediction for the worst val samples."""
        rows = []
        for index, iou, pred in worst:
            image, truth = self.dataset.load(index)
            rows.append(visualize.panel(
                [visualize.to_rgb8(image), visualize.colorize(truth, self.num_classes),
                 visualize.colorize(pred, self.num_classes)],
                [self.dataset.samples[index].stem[:24], "truth", f"pred IoU {iou:.3f}"]))
        return visualize.stack_rows(rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
