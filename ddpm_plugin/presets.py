"""The paper's UNet architectures and training recipes, named after their data sets.

Each preset is a dict of `UNet2DModel` keyword arguments with its parameter count beside it, plus the
training hyper-parameters of Ho et al. (2020), Appendix B. `cifar10` and `celebahq`/`lsun` are the
paper's networks; `mnist` and `digits` are small networks of the same design for CPU machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .vocabulary import PaperVarianceType

if TYPE_CHECKING:  # diffusers imports torch: loaded only when a network is built
    from diffusers import UNet2DModel

# Settings every preset shares, which reproduce the official network in diffusers' UNet2DModel:
# sinusoidal embedding without the cos/sin flip and with shift 1, GroupNorm eps 1e-6, single-head
# attention, downsampling convolutions without padding (the official code pads asymmetrically).
_PAPER_UNET_DEFAULTS: dict[str, Any] = {
    "layers_per_block": 2,
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "attention_head_dim": None,
    "time_embedding_type": "positional",
}


def _blocks(num_levels: int, attention_level: int) -> dict[str, tuple[str, ...]]:
    """Down/up block types with self-attention at one resolution level (0 = full resolution)."""
    down = tuple("AttnDownBlock2D" if i == attention_level else "DownBlock2D" for i in range(num_levels))
    return {"down_block_types": down, "up_block_types": tuple(b.replace("Down", "Up") for b in reversed(down))}


@dataclass(frozen=True)
class Preset:
    """A named architecture with the recipe it is trained with."""

    name: str
    image_size: int  # pixels per side
    channels: int  # image channels
    num_parameters: int  # exact count of UNet parameters (the paper's for cifar10/celebahq/lsun)
    unet_kwargs: dict[str, Any]
    variance_type: PaperVarianceType  # sigma_t^2 used for sampling: beta_t ("fixed_large") or beta_tilde_t
    learning_rate: float  # Adam step size
    batch_size: int  # global batch size
    warmup_steps: int  # linear learning-rate warmup, then constant
    ema_decay: float  # EMA of the weights, from step 0
    dropout: float  # in every ResNet block
    random_flip: bool  # random horizontal flips of training images
    grad_clip_norm: float = 1.0  # global-norm gradient clipping
    dataset: str | None = None  # the data set the preset is named after, as `ddpm train --dataset` takes it
    notes: str = field(default="", compare=False)

    def unet_config(self, **overrides: Any) -> dict[str, Any]:
        config = {
            **_PAPER_UNET_DEFAULTS,
            "sample_size": self.image_size,
            "in_channels": self.channels,
            "out_channels": self.channels,
            "dropout": self.dropout,
            **self.unet_kwargs,
        }
        config.update(overrides)
        return config


PRESETS: dict[str, Preset] = {
    "cifar10": Preset(
        name="cifar10", image_size=32, channels=3, num_parameters=35_746_307,
        unet_kwargs={"block_out_channels": (128, 256, 256, 256), **_blocks(4, attention_level=1)},
        variance_type="fixed_large", learning_rate=2e-4, batch_size=128, warmup_steps=5000,
        ema_decay=0.9999, dropout=0.1, random_flip=True,
        notes="Paper Table 1: 35.7M parameters, 800k steps, FID 3.17, NLL <= 3.75 bits/dim.",
    ),
    "celebahq": Preset(
        name="celebahq", image_size=256, channels=3, num_parameters=113_673_219,
        unet_kwargs={"block_out_channels": (128, 128, 256, 256, 512, 512), **_blocks(6, attention_level=4)},
        variance_type="fixed_small", learning_rate=2e-5, batch_size=64, warmup_steps=5000,
        ema_decay=0.9999, dropout=0.0, random_flip=True,
        notes="Paper Appendix B: 114M parameters, 0.5M steps.",
    ),
    "lsun": Preset(
        name="lsun", image_size=256, channels=3, num_parameters=113_673_219,
        unet_kwargs={"block_out_channels": (128, 128, 256, 256, 512, 512), **_blocks(6, attention_level=4)},
        variance_type="fixed_small", learning_rate=2e-5, batch_size=64, warmup_steps=5000,
        ema_decay=0.9999, dropout=0.0, random_flip=True,
        notes="Paper Appendix B: LSUN church/bedroom 114M parameters; the 256M bedroom model is wider.",
    ),
    "mnist": Preset(
        name="mnist", image_size=28, channels=1, num_parameters=2_734_945,
        unet_kwargs={
            "block_out_channels": (32, 64, 128), "layers_per_block": 1, "norm_num_groups": 16,
            **_blocks(3, attention_level=2),
        },
        variance_type="fixed_large", learning_rate=5e-4, batch_size=64, warmup_steps=500,
        ema_decay=0.999, dropout=0.0, random_flip=False, dataset="mnist",
        notes="MNIST at its native 28x28 (28, 14, 7; attention at 7x7); sized for 2 CPU cores: 16 images x 1000 "
              "steps in well under a minute. No flips (they change the class).",
    ),
    "digits": Preset(
        name="digits", image_size=8, channels=1, num_parameters=701_345,
        unet_kwargs={
            "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
            **_blocks(2, attention_level=1),
        },
        variance_type="fixed_large", learning_rate=1e-3, batch_size=64, warmup_steps=100,
        ema_decay=0.99, dropout=0.0, random_flip=False, dataset="digits",
        notes="scikit-learn's bundled 8x8 digits; sized for CPU training in minutes (the bundled model: 4000 steps).",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {name!r}.") from None


class PaperUNet2DModel:
    """Builds stock `UNet2DModel`s with the paper's presets.

    `from_preset` returns a plain [`UNet2DModel`], not a subclass: saved configs, pipelines and
    `model_index.json` then name only stock diffusers classes, so any diffusers installation loads them,
    even a folder saved by the stock `DDPMPipeline`.

    Example:

    ```py
    >>> from ddpm_plugin import PaperUNet2DModel
    >>> unet = PaperUNet2DModel.from_preset("cifar10")
    >>> unet.num_parameters()
    35746307
    ```
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "UNet2DModel":
        raise TypeError("build the network with `PaperUNet2DModel.from_preset(name, **overrides)`.")

    @staticmethod
    def from_preset(name: str, **overrides: Any) -> "UNet2DModel":
        """A network of preset `name`, initialised as the paper's code does (`paper_init_`); `overrides` replace
        `UNet2DModel` arguments."""
        from diffusers import UNet2DModel

        return paper_init_(UNet2DModel(**get_preset(name).unet_config(**overrides)))


# The official network's output layers start at (near) zero, so each residual block and attention block begins
# as the identity and the network's first prediction is eps = 0 (its `init_scale=0.`, drawn with scale 1e-10).
ZERO_INIT_SCALE = 1e-10


def is_zero_init_layer(name: str) -> bool:
    """Whether `name` (a module path in a `UNet2DModel`) is one of the layers the official code starts at zero."""
    parts = name.split(".")
    return (name == "conv_out" or (len(parts) >= 3 and parts[-3] == "resnets" and parts[-1] == "conv2")
            or (len(parts) >= 4 and parts[-4] == "attentions" and parts[-2:] == ["to_out", "0"]))


def paper_init_(unet: "UNet2DModel") -> "UNet2DModel":
    """Initialise in place as the official DDPM code does: every convolution and dense layer gets fan-average
    uniform weights (TensorFlow's `variance_scaling(scale, "fan_avg", "uniform")`, i.e. Glorot uniform scaled by
    `scale`) and zero biases; `scale` is 1, except 1e-10 for the last convolution of each residual block, the
    attention output projection and the output convolution. Normalisation layers keep weight 1 and bias 0."""
    import math

    import torch

    with torch.no_grad():
        for name, module in unet.named_modules():
            if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                continue
            scale = ZERO_INIT_SCALE if is_zero_init_layer(name) else 1.0
            torch.nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return unet
