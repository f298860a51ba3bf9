"""Models: the architecture registry, the encoder weights policy, building a model from its metadata, and the
normalisation every model input goes through first (on the device)."""
import difflib
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from torch import nn

from checkpoint import ModelMeta, read_weights
from errors import UserError
from labels import ChannelStats, normalization

ARCHITECTURES = {
    "unet": smp.Unet,
    "unet++": smp.UnetPlusPlus,
    "manet": smp.MAnet,
    "linknet": smp.Linknet,
    "fpn": smp.FPN,
    "pspnet": smp.PSPNet,
    "pan": smp.PAN,
    "deeplabv3": smp.DeepLabV3,
    "deeplabv3+": smp.DeepLabV3Plus,
    "upernet": smp.UPerNet,
    "segformer": smp.Segformer,
    "dpt": smp.DPT,
}
ALIASES = {"unetplusplus": "unet++", "deeplabv3plus": "deeplabv3+"}
MIN_INPUT = {"pan": 128}  # PAN's pyramid attention pools the deepest features three more times


def min_input_size(arch: str) -> int:
    """The smallest height/width the architecture accepts (inputs are padded up to it)."""
    return MIN_INPUT.get(architecture(arch), 32)


def architecture(name: str) -> str:
    """The registry key for a user's -m value (case-insensitive, SMP class names accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ARCHITECTURES:
        raise UserError(f"unknown model -m {name}; choose one of: {', '.join(ARCHITECTURES)}")
    return key


def check_encoder(name: str) -> None:
    """Fail fast on an encoder name SMP and timm do not know, listing the close ones."""
    from segmentation_models_pytorch.encoders import encoders

    if name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:].split(".")[0]):
            return
        close = difflib.get_close_matches(name[3:], timm.list_models(), n=5)
        raise UserError(f"unknown timm encoder --encoder {name}"
                        + (f"; did you mean {', '.join('tu-' + c for c in close)}?" if close else
                           "; see timm.list_models() for names"))
    if name not in encoders:
        close = difflib.get_close_matches(name, list(encoders), n=4)
        raise UserError(f"unknown encoder --encoder {name}" + (f"; did you mean {', '.join(close)}?" if close else "")
                        + f" Valid: {', '.join(encoders)}, or any timm model as tu-<name>")


# --------------------------------------------------------------------------------------------- weights policy
def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _pretrained_tags(encoder: str) -> list[str]:
    if encoder.startswith("tu-"):
        import timm

        return ["imagenet"] if timm.models.is_model_pretrained(encoder[3:]) else []
    from segmentation_models_pytorch.encoders import encoders

    return list(encoders[encoder]["pretrained_settings"])


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB conv kernel for another channel count, as SMP does: summed for 1, repeated and rescaled otherwise."""
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    c = weight.shape[1]
    return weight[:, [i % c for i in range(in_channels)]] * (c / in_channels)


def load_weights_file(model: nn.Module, path: Path, in_channels: int) -> str:
    """Load a local weights file into the model: a segkit checkpoint (all matching tensors), or an encoder state
    dict (`.pth`/`.pt`/`.bin`/`.safetensors`, keys with or without an `encoder.` prefix)."""
    state = read_weights(path)
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        target = key if key in own else f"encoder.{key}" if f"encoder.{key}" in own else None
        if target is None:
            continue
        have = own[target]
        if value.ndim == 4 and have.ndim == 4 and value.shape[1] != have.shape[1] and \
                value.shape[0] == have.shape[0] and value.shape[1] == 3 and have.shape[1] == in_channels:
            value = _adapt_first_conv(value, in_channels)
        if value.shape == have.shape:
            loaded[target] = value
        else:
            skipped.append(target)
    encoder_keys = [k for k in own if k.startswith("encoder.")]
    if not any(k in loaded for k in encoder_keys):
        raise UserError(f"--encoder-weights {path}: no tensor matches the encoder of this model; was it saved "
                        "for another encoder?")
    model.load_state_dict(loaded, strict=False)
    n_enc = sum(k in loaded for k in encoder_keys)
    return (f"{path} ({n_enc}/{len(encoder_keys)} encoder tensors, {len(loaded) - n_enc} decoder/head tensors"
            + (f", {len(skipped)} skipped for shape" if skipped else "") + ")")


def build_model(meta: ModelMeta, weights: str = "none") -> tuple[nn.Module, str]:
    """The network ModelMeta describes (architecture, encoder, input channels, outputs), and a line saying where
    its weights came from.

    weights: "none"; "auto" (ImageNet when it can be had, else a loud warning and random init); a pretrained tag
    such as "imagenet" (must load, else a UserError saying how to proceed offline); or a path to a weights file.
    """
    arch, encoder, in_channels, out_channels = architecture(meta.arch), meta.encoder, meta.in_channels, \
        meta.out_channels
    check_encoder(encoder)
    cls = ARCHITECTURES[arch]

    extra = {"dynamic_img_size": True} if arch == "dpt" else {}  # ViT encoders then take any multiple of 16

    def make(encoder_weights):
        return cls(encoder_name=encoder, encoder_weights=encoder_weights, in_channels=in_channels,
                   classes=out_channels, **extra)

    try:
        model = make(None)
    except (ValueError, KeyError, AssertionError, RuntimeError, TypeError) as e:
        raise UserError(f"-m {arch} cannot be built with --encoder {encoder}: {str(e).splitlines()[0][:200]}"
                        ) from None
    if weights.lower() == "none":
        return model, "random initialisation (--encoder-weights none)"
    if Path(weights).exists():
        return model, "loaded from " + load_weights_file(model, Path(weights), in_channels)
    tags = _pretrained_tags(encoder)
    auto = weights.lower() == "auto"
    if auto:
        if not tags:
            return model, f"random initialisation ({encoder} has no pretrained weights)"
        tag = "imagenet" if "imagenet" in tags else tags[0]
    else:
        if weights not in tags and not (encoder.startswith("tu-") and weights == "imagenet"):
            looks_like_path = "/" in weights or "\\" in weights or Path(weights).suffix
            raise UserError(f"--encoder-weights {weights}: " + (
                "file not found" if looks_like_path else
                f"{encoder} has weights {', '.join(tags) or '(none)'}; use one of those, auto, none, or a file"))
        tag = weights
    t0 = time.monotonic()
    if not _hub_reachable():
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # cached weights still load; nothing waits on retries
    try:
        pretrained = make(True if encoder.startswith("tu-") else tag)
    except Exception as e:  # noqa: BLE001 -- hub, network and cache errors come in many types
        how = (f"on a machine with internet, run: python -c \"import segmentation_models_pytorch as smp; "
               f"smp.Unet('{encoder}', encoder_weights='{tag if not encoder.startswith('tu-') else True}')\" and "
               "copy ~/.cache/huggingface to this machine; or pass --encoder-weights PATH to a local weights "
               "file, or --encoder-weights none to train from scratch")
        if not auto:
            raise UserError(f"cannot get {tag} weights for {encoder} ({type(e).__name__}, offline?): {how}"
                            ) from None
        print(f"\nWARNING: {tag} weights for {encoder} are not available here ({type(e).__name__}; "
              f"{time.monotonic() - t0:.1f}s); TRAINING FROM SCRATCH, expect lower accuracy. To use them: {how}.\n",
              file=sys.stderr, flush=True)
        return model, f"random initialisation ({tag} weights unavailable offline)"
    return pretrained, f"{tag} weights for {encoder}"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile / DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# --------------------------------------------------------------------------------------------------- inference
class Normalize(nn.Module):
    """x * scale + shift per channel, in float32 on the device: zero mean and unit std over the training set.
    Inputs arrive as stored (uint8) or as float32, so the loaders copy as few bytes as possible."""

    def __init__(self, stats: ChannelStats, unit: bool = False):
        super().__init__()
        scale, shift = normalization(stats, unit)
        self.register_buffer("scale", torch.from_numpy(scale).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


class Segmenter(nn.Module):
    """Raw pixels (N, C, H, W) as stored -> logits: the normalisation, then the network. What validation, prediction
    and the ONNX export run; it shares the network's weights."""

    def __init__(self, net: nn.Module, stats: ChannelStats):
        super().__init__()
        self.normalize, self.net = Normalize(stats), net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def model_from_meta(meta: ModelMeta, state: dict) -> nn.Module:
    """The trained network described by a checkpoint's metadata, with its weights."""
    model, _ = build_model(meta)
    model.load_state_dict(state)
    return model
