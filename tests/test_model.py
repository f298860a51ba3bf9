import argparse
import time

import pytest
import torch
from conftest import network

import checkpoint
from checkpoint import Checkpoint, ModelMeta
from errors import UserError
from labels import ChannelStats, Labels
from model import ARCHITECTURES, min_input_size


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_builds_and_keeps_input_size(arch):
    encoder = "tu-test_vit" if arch == "dpt" else "resnet18"
    model, _ = network(arch, encoder, in_channels=4, out_channels=3, weights="none")
    size = max(64, min_input_size(arch))
    with torch.no_grad():
        y = model.eval()(torch.randn(2, 4, size, size + 32))
    assert y.shape == (2, 3, size, size + 32)


def test_aliases_and_unknown_names_list_the_choices():
    assert network("UnetPlusPlus", "resnet18", 3, 1)[0].__class__.__name__ == "UnetPlusPlus"
    with pytest.raises(UserError, match=r"unetx.*unet, unet\+\+"):
        network("unetx", "resnet18", 3, 1)
    with pytest.raises(UserError, match=r"resnet999.*did you mean"):
        network("unet", "resnet999", 3, 1)
    with pytest.raises(UserError, match="tu-resnet999x"):
        network("unet", "tu-resnet999x", 3, 1)
    with pytest.raises(UserError, match="dpt cannot be built with --encoder resnet18"):
        network("dpt", "resnet18", 3, 1)


def test_auto_weights_offline_fall_back_fast_and_loudly(capsys):
    t0 = time.monotonic()
    _, desc = network("unet", "resnet18", 4, 1, "auto")
    assert time.monotonic() - t0 < 5
    assert "random initialisation" in desc
    assert "TRAINING FROM SCRATCH" in capsys.readouterr().err


def test_explicit_imagenet_offline_fails_with_the_way_out():
    with pytest.raises(UserError, match="--encoder-weights PATH"):
        network("unet", "resnet18", 3, 1, "imagenet")
    with pytest.raises(UserError, match="has weights imagenet, ssl, swsl"):
        network("unet", "resnet18", 3, 1, "imagenet22k")
    with pytest.raises(UserError, match="file not found"):
        network("unet", "resnet18", 3, 1, "weights/missing.pth")


def test_local_encoder_weights_file_adapts_first_conv(tmp_path):
    source, _ = network("unet", "resnet18", 3, 1)
    torch.save(source.encoder.state_dict(), tmp_path / "enc.pth")
    model, desc = network("unet", "resnet18", 5, 2, str(tmp_path / "enc.pth"))
    assert "encoder tensors" in desc
    rgb = source.encoder.conv1.weight
    assert torch.allclose(model.encoder.conv1.weight[:, :3], rgb * 3 / 5)
    assert torch.allclose(model.encoder.conv1.weight[:, 3:], rgb[:, :2] * 3 / 5)
    assert torch.equal(model.encoder.layer4[1].conv2.weight, source.encoder.layer4[1].conv2.weight)


def test_weights_file_of_another_encoder_is_refused(tmp_path):
    other, _ = network("unet", "efficientnet-b0", 3, 1)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="no tensor matches"):
        network("unet", "resnet18", 3, 1, str(tmp_path / "other.pth"))


def tiny_meta() -> ModelMeta:
    return ModelMeta("unet", "resnet18", 3, 1, Labels([255]), [], ChannelStats([0.0] * 3, [1.0] * 3, [0.0] * 3,
                                                                           [255.0] * 3, [10, 5]), "uint8", 64, False,
                     1024)


def test_checkpoint_round_trip_and_checks(tmp_path):
    meta = tiny_meta()
    checkpoint.save(tmp_path / "ok.pth", Checkpoint({"w": torch.ones(2)}, meta, 3, 0.5))
    ckpt = checkpoint.load(tmp_path / "ok.pth")
    assert ckpt.meta == meta and ckpt.epoch == 3 and ckpt.score == 0.5 and ckpt.training is None
    assert torch.load(tmp_path / "ok.pth", weights_only=True)["meta"]["version"] == checkpoint.VERSION
    torch.save({"model": {}}, tmp_path / "plain.pth")
    with pytest.raises(UserError, match="not a segkit checkpoint"):
        checkpoint.load(tmp_path / "plain.pth")
    torch.save({"model": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")  # pickled objects, like older kits
    with pytest.raises(UserError, match="another tool"):
        checkpoint.load(tmp_path / "pickled.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        checkpoint.load(tmp_path / "text.pth")
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "none.pth")
    newer = {**meta.to_dict(), "version": checkpoint.VERSION + 1}
    torch.save({"model": {}, "meta": newer, "epoch": 1}, tmp_path / "newer.pth")
    with pytest.raises(UserError, match="newer segkit"):
        checkpoint.load(tmp_path / "newer.pth")
    broken = meta.to_dict()
    del broken["stats"]
    torch.save({"model": {}, "meta": broken, "epoch": 1}, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.load(tmp_path / "broken.pth")


def test_version_1_checkpoints_are_read(tmp_path):
    """segkit 0.1 kept the training state at the top level of last.pth."""
    meta = {**tiny_meta().to_dict(), "version": 1}
    state = {"epoch": 4, "best_score": 0.7, "best_epoch": 3, "bad_epochs": 1, "early_stopped": False,
             "history": [{"epoch": 1}]}
    torch.save({"model": {"w": torch.ones(1)}, "meta": meta, "optimizer": {"state": {}}, "scheduler": {"x": 1},
                "scaler": {}, **state}, tmp_path / "last.pth")
    ckpt = checkpoint.load(tmp_path / "last.pth")
    assert ckpt.epoch == 4 and ckpt.meta == tiny_meta() and ckpt.training["state"] == state
    assert ckpt.training["scheduler"] == {"x": 1}
    torch.save({"model": {"w": torch.ones(1)}, "meta": meta, "epoch": 3, "score": 0.7}, tmp_path / "best.pth")
    assert checkpoint.load(tmp_path / "best.pth").score == 0.7
