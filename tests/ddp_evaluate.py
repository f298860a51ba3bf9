"""Score the val set once with train.py's own pieces, as a single process or as every process of a torchrun job,
and save process 0's result to the .npz named first: tests/test_ddp.py compares the two. The other arguments are
train.py's flags (a model seeded by --seed, so both runs score the same weights)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train
from dataset import Labels
from loaders import epoch_stream
from runtime import Processes
from trainer import Trainer


def main(out: str, argv: list[str]) -> None:
    args = train.get_args_parser().parse_args(argv)
    procs = Processes(cpu=True)
    exp = procs.share(train.experiment_dir(args) if procs.main else None)
    labels = Labels.from_args(args.class_list, args.max_mask_val, args.ignore_label)
    splits = train.find_splits(args)
    data, workers = train.check_data(args, splits, labels, exp, procs)
    model, meta, _ = train.make_model(args, data, labels, None, procs)
    train_loader, evals = train.make_loaders(args, splits, data, meta, workers, procs)
    trainer = Trainer(train.train_config(args, exp, procs), model, train_loader, evals, meta)
    result = trainer.evaluate(evals[0], next(epoch_stream(evals[0].loader)))
    if procs.main:
        np.savez(out, confusion=np.array(result.scores["confusion_matrix"]), loss=result.loss,
                 per_image_iou=result.per_image_iou.numpy())
    procs.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
