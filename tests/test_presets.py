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
