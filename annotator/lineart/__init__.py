"""Line art with ControlNet 1.1's line-drawing network (sk_model.pth, from Chan et al.'s "informative drawings",
MIT licence): an image-to-image generator that draws an RGB picture as dark lines on white. The lineart ControlNet
reads the inverse, white lines on black, which is the hint this detector returns.

The network is a small ResNet generator: a 7x7 convolution, two stride-2 convolutions, three residual blocks, two
transposed convolutions back up and a 7x7 convolution to one channel with a sigmoid; instance norms (no weights)
and reflection padding throughout. Module names follow the published file (`model0` ... `model4`, positions
inside each Sequential), so it loads strictly. ControlNet 1.1 also ships a "coarse" variant (sk_model2.pth) of the
same network.
"""

import numpy as np
import torch
from einops import rearrange
from torch import nn

from annotator.util import NetworkDetector, check_rgb

WEIGHTS_FILE = "sk_model.pth"
WEIGHTS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth"


def norm_relu(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(channels), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + (pad, 3x3 conv, norm, ReLU, pad, 3x3 conv, norm)(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), *norm_relu(channels),
                                        nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3),
                                        nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineDrawingGenerator(nn.Module):
    """Bx3xHxW RGB in [0, 1] -> Bx1xHxW line drawing in [0, 1] (0 = line, 1 = paper); H and W multiples of 4."""

    def __init__(self, residual_blocks: int = 3, width: int = 64) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7), *norm_relu(width))
        self.model1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), *norm_relu(2 * width),
                                    nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), *norm_relu(4 * width))
        self.model2 = nn.Sequential(*(ResidualBlock(4 * width) for _ in range(residual_blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 3, stride=2, padding=1, output_padding=1), *norm_relu(2 * width),
            nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1), *norm_relu(width))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class LineartDetector(NetworkDetector):
    """HWC uint8 RGB -> HxW uint8 line art, white lines on black (the lineart ControlNet's hint)."""

    network, weights_file, weights_url = LineDrawingGenerator, WEIGHTS_FILE, WEIGHTS_URL

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        check_rgb(image)
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, torch.float32) / 255.0
        drawing = self.model(rearrange(x, "h w c -> 1 c h w"))[0, 0].cpu().numpy()
        return 255 - (drawing * 255.0).clip(0, 255).astype(np.uint8)
