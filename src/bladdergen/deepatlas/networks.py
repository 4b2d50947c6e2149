"""The two DeepAtlas networks: segmentation F_S and registration F_R (MONAI ``DynUNet`` backbones).

Layout everywhere (B, C, X, Y, Z), Z the axial slice axis. CT slices are thick (3-5 mm against
0.6-0.9 mm in-plane), so the first levels convolve and downsample within the axial plane only:
kernel (3, 3, 1), stride (2, 2, 1); deeper levels use (3, 3, 3) and stride 2 on every axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.networks.nets import DynUNet
from torch import nn
from torch.utils.checkpoint import checkpoint

from bladdergen.deepatlas.config import DeepAtlasConfig

N_CLASSES = 3  # background, wall, tumor


def anisotropic_plan(
    n_levels: int, inplane_levels: int
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Kernel sizes and strides of a ``DynUNet`` with ``n_levels`` resolution levels.

    Level 0 keeps the resolution; levels 1..``inplane_levels`` halve X and Y only; later levels
    halve all axes. Kernels are (3, 3, 1) at in-plane-only resolutions, else (3, 3, 3).
    """
    kernels: list[tuple[int, int, int]] = []
    strides: list[tuple[int, int, int]] = []
    for level in range(n_levels):
        inplane = level <= inplane_levels and inplane_levels > 0
        # the level-0 kernel is in-plane whenever the first downsampling is
        kernels.append((3, 3, 1) if inplane else (3, 3, 3))
        if level == 0:
            strides.append((1, 1, 1))
        elif level <= inplane_levels:
            strides.append((2, 2, 1))
        else:
            strides.append((2, 2, 2))
    return kernels, strides


def size_multiple(strides: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """What every spatial size must be divisible by for a network with these strides."""
    return tuple(math.prod(s[axis] for s in strides) for axis in range(3))


def _dynunet(
    in_channels: int, out_channels: int, filters: tuple[int, ...], inplane_levels: int
) -> tuple[DynUNet, tuple[int, int, int]]:
    kernels, strides = anisotropic_plan(len(filters), inplane_levels)
    net = DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(filters),
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        res_block=False,
    )
    return net, size_multiple(strides)


def _checkpointed(forward: Callable[[torch.Tensor], torch.Tensor]):
    def run(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(forward, x, use_reentrant=False)
        return forward(x)

    return run


def enable_activation_checkpointing(module: nn.Module) -> None:
    """Recompute each DynUNet conv block in the backward pass instead of storing its activations.

    Only the block inputs are kept, which is what lets whole 512x512x24 volumes train on one
    24 GB GPU; it costs about one extra forward pass. The state dict is unchanged.
    """
    for block in module.modules():
        if isinstance(block, UnetBasicBlock):
            block.forward = _checkpointed(block.forward)


class SegmentationNet(nn.Module):
    """F_S: image (B, 1, X, Y, Z) in [-1, 1] -> logits (B, 3, X, Y, Z) (background, wall, tumor).

    ``roi_size`` is the training volume shape; inference on larger volumes slides a window of that
    size (see :func:`bladdergen.deepatlas.segment.predict_classes`).
    """

    def __init__(self, filters: tuple[int, ...], inplane_levels: int) -> None:
        super().__init__()
        self.unet, self.multiple = _dynunet(1, N_CLASSES, filters, inplane_levels)
        self.roi_size: tuple[int, int, int] | None = None

    @classmethod
    def from_config(cls, config: DeepAtlasConfig) -> SegmentationNet:
        net = cls(tuple(config.seg_filters), config.seg_inplane_levels)
        if config.activation_checkpointing:
            enable_activation_checkpointing(net)
        return net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet(image)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Bottleneck activations averaged over space: (B, 1, X, Y, Z) -> (B, filters[-1])."""
        captured: list[torch.Tensor] = []
        handle = self.unet.bottleneck.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output)
        )
        try:
            self.unet(image)
        finally:
            handle.remove()
        return captured[0].mean(dim=(2, 3, 4))


class RegistrationNet(nn.Module):
    """F_R: (moving, target), each (B, 1, X, Y, Z) -> displacement field (B, 3, X, Y, Z) in voxels.

    Channel k of the field is the displacement along spatial axis k (MONAI ``Warp`` convention:
    ``warped(x) = moving(x + u(x))``). The input pair is concatenated as ``[moving, target]``.
    With ``diffeomorphic`` the network output is a stationary velocity field integrated by scaling
    and squaring (MONAI ``DVF2DDF``). With ``inplane_downsample`` f > 1 the pair is average-pooled
    by (f, f, 1), and the field is upsampled back and its X, Y components multiplied by f.
    """

    def __init__(
        self,
        filters: tuple[int, ...],
        inplane_levels: int,
        inplane_downsample: int = 1,
        diffeomorphic: bool = False,
        integration_steps: int = 7,
    ) -> None:
        super().__init__()
        self.unet, self.multiple = _dynunet(2, 3, filters, inplane_levels)
        self.inplane_downsample = inplane_downsample
        factor = (inplane_downsample, inplane_downsample, 1)
        self.multiple = tuple(m * f for m, f in zip(self.multiple, factor, strict=True))
        # near-zero last layer: training starts from (almost) the identity transform
        out_conv = self.unet.output_block.conv.conv
        nn.init.normal_(out_conv.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(out_conv.bias)
        self.integrate = (
            DVF2DDF(num_steps=integration_steps, mode="bilinear", padding_mode="border")
            if diffeomorphic and integration_steps > 0
            else None
        )

    @classmethod
    def from_config(cls, config: DeepAtlasConfig) -> RegistrationNet:
        net = cls(
            tuple(config.reg_filters),
            config.reg_inplane_levels,
            config.reg_inplane_downsample,
            config.diffeomorphic,
            config.integration_steps,
        )
        if config.activation_checkpointing:
            enable_activation_checkpointing(net)
        return net

    def forward(self, moving: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([moving, target], dim=1)
        f = self.inplane_downsample
        if f > 1:
            pair = F.avg_pool3d(pair, kernel_size=(f, f, 1), stride=(f, f, 1))
        field = self.unet(pair)
        if self.integrate is not None:
            field = self.integrate(field)
        if f > 1:
            field = F.interpolate(
                field, size=moving.shape[2:], mode="trilinear", align_corners=False
            )
            scale = torch.tensor([f, f, 1.0], dtype=field.dtype, device=field.device)
            field = field * scale.view(1, 3, 1, 1, 1)
        return field


def _alias_map(module: nn.Module) -> dict[str, str]:
    """State-dict keys that alias an earlier key's tensor -> that earlier key.

    MONAI's ``DynUNet`` registers its blocks twice (``input_block`` ... and ``skip_layers``), so its
    state dict names each shared tensor twice; safetensors refuses shared tensors.
    """
    seen: dict[int, str] = {}
    aliases = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if pointer in seen and tensor.numel() > 0:
            aliases[key] = seen[pointer]
        else:
            seen[pointer] = key
    return aliases


def portable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with each shared tensor stored once (safetensors-compatible)."""
    aliases = _alias_map(module)
    return {k: v for k, v in module.state_dict().items() if k not in aliases}


def expand_state_dict(
    module: nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`portable_state_dict`: add the aliased keys back for ``load_state_dict``."""
    full = dict(tensors)
    for alias, key in _alias_map(module).items():
        if alias not in full and key in full:
            full[alias] = full[key]
    return full
