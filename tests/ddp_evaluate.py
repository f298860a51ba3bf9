"""Score the val set once with train.py's own pieces, as a single process or as every process of a torchrun job,
and save process 0's result to the .npz named first: tests/test_ddp.py compares the two. The other arguments are
train.py's flags (a model seeded by --seed, so both runs score the same weights)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import make_trainer

import train
from loaders import epoch_stream
from runtime import Processes


def main(out: str, argv: list[str]) -> None:
    args = train.get_args_parser().parse_args(argv)
    procs = Processes(cpu=True)
    exp = procs.share(train.experiment_dir(args) if procs.main else None)
    trainer, evals = make_trainer(args, exp, procs)
    result = trainer.evaluate(evals[0], next(epoch_stream(evals[0].loader)))
    if procs.main:
        np.savez(out, confusion=np.array(result.scores["confusion_matrix"]), loss=result.loss,
                 per_image_iou=result.per_image_iou.numpy())
    procs.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
