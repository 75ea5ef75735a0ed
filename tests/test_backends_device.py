"""`DeviceDenoiser`: the one wrapper that runs a PyTorch UNet on a device other than the loop's."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from qdiff.runtime.backends import DeviceDenoiser, TorchDenoiser


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


def test_device_denoiser_equals_torch_denoiser_and_returns_on_the_inputs_device():
    unet = _tiny_unet().train()  # the wrapper must put it in eval mode
    sample = torch.randn(2, 3, 8, 8, dtype=torch.float64).float()
    wrapped = DeviceDenoiser(unet, "cpu")
    assert not wrapped.unet.training
    got = wrapped(sample, 500)
    want = TorchDenoiser(unet.eval())(sample, torch.tensor(500.0))
    assert got.device == sample.device
    assert torch.equal(got, want)
    assert got.shape == sample.shape
