import pytest
import torch
from diffusers import UNet2DModel

from ddpm_plugin import PRESETS, PaperUNet2DModel, get_preset


@pytest.mark.parametrize("name", ["cifar10", "celebahq", "lsun", "mnist", "digits"])
def test_preset_has_its_parameter_count(name):
    unet = PaperUNet2DModel.from_preset(name)
    assert unet.num_parameters() == PRESETS[name].num_parameters


def test_cifar10_preset_has_paper_parameter_count():
    assert PRESETS["cifar10"].num_parameters == 35_746_307
    unet = PaperUNet2DModel.from_preset("cifar10")
    assert unet.config.dropout == 0.1 and unet.config.in_channels == 3 and unet.config.sample_size == 32
    # One attention level, at 16x16 (the second of four resolutions), plus the middle block.
    assert unet.config.down_block_types[1] == "AttnDownBlock2D"


def test_256_presets_have_paper_parameter_count():
    assert PRESETS["celebahq"].num_parameters == PRESETS["lsun"].num_parameters == 113_673_219
    assert PRESETS["celebahq"].variance_type == "fixed_small"


def test_presets_carry_the_paper_recipe():
    cifar = PRESETS["cifar10"]
    assert (cifar.learning_rate, cifar.batch_size, cifar.warmup_steps, cifar.ema_decay) == (2e-4, 128, 5000, 0.9999)
    assert cifar.random_flip and cifar.grad_clip_norm == 1.0
    assert (PRESETS["celebahq"].learning_rate, PRESETS["celebahq"].batch_size) == (2e-5, 64)
    # Flipping a digit changes its class.
    assert not PRESETS["digits"].random_flip and not PRESETS["mnist"].random_flip


def test_unknown_preset_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="cifar10"):
        get_preset("imagenet")


def test_overrides_replace_unet_arguments():
    unet = PaperUNet2DModel.from_preset("digits", block_out_channels=(16, 32), norm_num_groups=8, dropout=0.3)
    assert unet.config.block_out_channels == (16, 32) and unet.config.dropout == 0.3


def test_saved_preset_loads_as_stock_unet(tmp_path):
    unet = PaperUNet2DModel.from_preset("digits").eval()
    unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert '"_class_name": "UNet2DModel"' in (tmp_path / "config.json").read_text()
    stock = UNet2DModel.from_pretrained(tmp_path).eval()
    assert type(stock) is UNet2DModel
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, stock(x, t).sample)


def _uniform_limit(weight: torch.Tensor) -> float:
    """Glorot/fan-average uniform bound sqrt(6 / (fan_in + fan_out)) of a conv or dense weight."""
    receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
    return (6.0 / ((weight.shape[0] + weight.shape[1]) * receptive)) ** 0.5


def test_presets_initialise_as_the_papers_code():
    torch.manual_seed(0)
    unet = PaperUNet2DModel.from_preset("cifar10")
    modules = dict(unet.named_modules())
    zero_layers = ["conv_out", "down_blocks.0.resnets.0.conv2", "mid_block.resnets.1.conv2",
                   "up_blocks.2.resnets.2.conv2", "down_blocks.1.attentions.0.to_out.0", "mid_block.attentions.0.to_out.0"]
    for name in zero_layers:
        # variance_scaling(1e-10): the Glorot bound times sqrt(1e-10).
        weight = modules[name].weight
        assert 0 < weight.abs().max() <= 1e-5 * _uniform_limit(weight), name
    for name in ["conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.to_q",
                 "time_embedding.linear_1", "up_blocks.0.resnets.0.conv_shortcut", "down_blocks.0.downsamplers.0.conv"]:
        weight, limit = modules[name].weight, _uniform_limit(modules[name].weight)
        assert weight.abs().max() <= limit
        # A uniform draw on [-a, a] has standard deviation a / sqrt(3); PyTorch's default (kaiming, a=sqrt(5)) does not.
        assert weight.std().item() == pytest.approx(limit / 3**0.5, rel=0.1), name
    biases = [m.bias for m in modules.values() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None]
    assert biases and all(not b.any() for b in biases)
    norms = [m for m in modules.values() if isinstance(m, torch.nn.GroupNorm)]
    assert all(torch.all(m.weight == 1) and not m.bias.any() for m in norms)
    # The network starts as the paper's: it predicts eps = 0 for any input.
    with torch.no_grad():
        eps = unet(torch.randn(1, 3, 32, 32), torch.tensor([500])).sample
    assert eps.abs().max() < 1e-3
