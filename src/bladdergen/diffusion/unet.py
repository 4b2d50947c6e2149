"""The pseudo-3D U-Net denoiser of Medical Diffusion's latent DDPM.

Tensors are (B, C, X, Y, Z) with Z the axial (depth) axis. Every convolution works within the
axial plane (kernel (3, 3, 1)); the U-Net halves X and Y only, never Z. Slices exchange information
through **depth attention**: in-plane positions folded into the batch, the Z slices are the tokens,
with a learned relative position bias. At every level a **spatial attention** block (slices folded
into the batch) precedes it: linear attention at the high-resolution levels, full softmax
attention at the bottleneck. Softmax attention uses PyTorch's fused
``F.scaled_dot_product_attention``. With ``coordinate_channels`` every voxel's X, Y, Z position
enters with the latent: the only absolute position the denoiser sees along Z.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from bladdergen.diffusion.config import LDMConfig

IN_PLANE = (3, 3, 1)
IN_PLANE_PADDING = (1, 1, 0)


def timestep_embedding(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (B,) -> (B, channels), float32."""
    half = channels // 2
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    )
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def voxel_coordinates(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, X, Y, Z) of each voxel's X, Y and Z position in [-1, 1], in ``x``'s dtype and device.

    An absolute position signal: in-plane convolutions see the X/Y borders through their zero
    padding, but nothing in the denoiser sees Z but relative slice distances.
    """
    batch, _, *sizes = x.shape
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in sizes]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.expand(batch, -1, -1, -1, -1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis only, per voxel, with a learned gain and no bias."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_norm over the last axis with channels moved there: a var_mean over axis 1 to
        # within 1e-6, and a faster training step on CPU (bench/bench_channel_norm.py)
        normed = F.layer_norm(x.movedim(1, -1), (x.shape[1],), eps=self.eps).movedim(-1, 1)
        return normed * self.gain


class ResBlock(nn.Module):
    """Two in-plane convolutions with GroupNorm + SiLU, time-conditioned by scale and shift (FiLM).

    (B, C_in, X, Y, Z) and a time embedding (B, T_emb) -> (B, C_out, X, Y, Z).
    """

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(groups, in_channels), in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, IN_PLANE, padding=IN_PLANE_PADDING)
        self.time = nn.Linear(time_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, IN_PLANE, padding=IN_PLANE_PADDING)
        self.skip = (
            nn.Conv3d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.time(F.silu(time)), "b c -> b c 1 1 1").chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class SpatialLinearAttention(nn.Module):
    """Linear attention over the X*Y positions of each axial slice (cost linear in X*Y).

    Queries are softmax-normalised over channels, keys over positions (Shen et al.).
    (B, C, X, Y, Z) -> (B, C, X, Y, Z).
    """

    def __init__(self, channels: int, heads: int, head_channels: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = head_channels**-0.5
        self.to_qkv = nn.Conv3d(channels, 3 * heads * head_channels, 1, bias=False)
        self.to_out = nn.Conv3d(heads * head_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_x, size_y = x.shape[2], x.shape[3]
        q, k, v = rearrange(
            self.to_qkv(x), "b (three h d) x y z -> three (b z) h d (x y)", three=3, h=self.heads
        )
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("b h d n, b h e n -> b h d e", k, v)
        out = torch.einsum("b h d e, b h d n -> b h e n", context, q)
        out = rearrange(out, "(b z) h e (x y) -> b (h e) x y z", z=x.shape[4], x=size_x, y=size_y)
        return self.to_out(out)


class SpatialFullAttention(nn.Module):
    """Softmax attention over the X*Y positions of each axial slice (used at the bottleneck).

    (B, C, X, Y, Z) -> (B, C, X, Y, Z).
    """

    def __init__(self, channels: int, heads: int, head_channels: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Conv3d(channels, 3 * heads * head_channels, 1, bias=False)
        self.to_out = nn.Conv3d(heads * head_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_x, size_y = x.shape[2], x.shape[3]
        q, k, v = rearrange(
            self.to_qkv(x), "b (three h d) x y z -> three (b z) h (x y) d", three=3, h=self.heads
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "(b z) h (x y) d -> b (h d) x y z", z=x.shape[4], x=size_x, y=size_y)
        return self.to_out(out)


class DepthAttention(nn.Module):
    """Softmax attention along Z: every in-plane position attends over its column of slices.

    A learned bias per head and relative slice distance (clamped at ``max_distance``) tells the
    attention which slices are neighbours. (B, C, X, Y, Z) -> (B, C, X, Y, Z).
    """

    def __init__(self, channels: int, heads: int, head_channels: int, max_distance: int) -> None:
        super().__init__()
        self.heads = heads
        self.max_distance = max_distance
        self.to_qkv = nn.Conv3d(channels, 3 * heads * head_channels, 1, bias=False)
        self.to_out = nn.Conv3d(heads * head_channels, channels, 1, bias=False)
        self.relative_bias = nn.Embedding(2 * max_distance + 1, heads)

    def position_bias(self, depth: int, device: torch.device) -> torch.Tensor:
        """Additive attention bias (heads, Z, Z) from the relative distance ``j - i`` of slices."""
        positions = torch.arange(depth, device=device)
        distance = (positions[None, :] - positions[:, None]).clamp(
            -self.max_distance, self.max_distance
        )
        return rearrange(self.relative_bias(distance + self.max_distance), "i j h -> h i j")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, size_x, size_y, depth = x.shape
        q, k, v = rearrange(
            self.to_qkv(x), "b (three h d) x y z -> three (b x y) h z d", three=3, h=self.heads
        )
        bias = self.position_bias(depth, x.device).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = rearrange(out, "(b x y) h z d -> b (h d) x y z", x=size_x, y=size_y)
        return self.to_out(out)


class PreNormResidual(nn.Module):
    """``x + block(norm(x))``."""

    def __init__(self, channels: int, block: nn.Module) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(self.norm(x))


class Level(nn.Module):
    """Two ResBlocks, spatial attention, depth attention: one U-Net level at one resolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_channels: int,
        config: LDMConfig,
        full_spatial_attention: bool,
    ) -> None:
        super().__init__()
        heads, head_channels = config.attention_heads, config.attention_head_channels
        self.res1 = ResBlock(in_channels, out_channels, time_channels, config.norm_groups)
        self.res2 = ResBlock(out_channels, out_channels, time_channels, config.norm_groups)
        spatial = SpatialFullAttention if full_spatial_attention else SpatialLinearAttention
        self.spatial_attention = PreNormResidual(
            out_channels, spatial(out_channels, heads, head_channels)
        )
        self.depth_attention = PreNormResidual(
            out_channels,
            DepthAttention(out_channels, heads, head_channels, config.max_relative_distance),
        )

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        x = self.res2(self.res1(x, time), time)
        return self.depth_attention(self.spatial_attention(x))


class PseudoUNet3D(nn.Module):
    """Noise predictor ``eps = net(x_t, t)`` for latents (B, C, X, Y, Z), t integer (B,).

    Levels ``i = 0..L-1`` have ``base_channels * channel_mults[i]`` channels; X and Y are halved
    between levels (so both must be divisible by ``2 ** (L - 1)``), Z is kept.
    """

    def __init__(self, latent_channels: int, config: LDMConfig) -> None:
        super().__init__()
        base = config.base_channels
        widths = [base * m for m in config.channel_mults]
        time_channels = 4 * base
        self.latent_channels = latent_channels
        self.levels = len(widths)
        self.coordinate_channels = config.coordinate_channels
        in_channels = latent_channels + (3 if config.coordinate_channels else 0)
        self.init_conv = nn.Conv3d(in_channels, base, (7, 7, 1), padding=(3, 3, 0))
        self.init_depth_attention = PreNormResidual(
            base,
            DepthAttention(
                base,
                config.attention_heads,
                config.attention_head_channels,
                config.max_relative_distance,
            ),
        )
        self.time_mlp = nn.Sequential(
            nn.Linear(base, time_channels), nn.GELU(), nn.Linear(time_channels, time_channels)
        )
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        in_channels = base
        for i, width in enumerate(widths):
            self.down_levels.append(Level(in_channels, width, time_channels, config, False))
            last = i == len(widths) - 1
            self.downsamples.append(
                nn.Identity()
                if last
                else nn.Conv3d(width, width, (4, 4, 1), stride=(2, 2, 1), padding=(1, 1, 0))
            )
            in_channels = width
        # bottleneck: the only level with full softmax attention over the slice
        self.middle = Level(widths[-1], widths[-1], time_channels, config, True)
        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up_levels.append(
                Level(in_channels + widths[i], widths[i], time_channels, config, False)
            )
            if i > 0:
                self.upsamples.append(
                    nn.ConvTranspose3d(
                        widths[i], widths[i - 1], (4, 4, 1), stride=(2, 2, 1), padding=(1, 1, 0)
                    )
                )
            else:
                self.upsamples.append(nn.Identity())
            in_channels = widths[i - 1] if i > 0 else widths[0]
        self.final = ResBlock(widths[0] + base, base, time_channels, config.norm_groups)
        self.out_conv = nn.Conv3d(base, latent_channels, 1)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError unless (B, C, X, Y, Z) fits: C latent channels, X and Y divisible."""
        factor = 2 ** (self.levels - 1)
        if len(shape) != 5 or shape[1] != self.latent_channels:
            raise ValueError(f"expected (B, {self.latent_channels}, X, Y, Z), got {tuple(shape)}")
        if shape[2] % factor or shape[3] % factor:
            raise ValueError(
                f"latent in-plane size {shape[2]}x{shape[3]} must be divisible by {factor} "
                f"for a {self.levels}-level U-Net"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check_shape(tuple(x.shape))
        time = self.time_mlp(timestep_embedding(t, self.init_conv.out_channels).to(x.dtype))
        if self.coordinate_channels:
            x = torch.cat([x, voxel_coordinates(x)], dim=1)
        h = self.init_depth_attention(self.init_conv(x))
        first = h
        skips = []
        for level, downsample in zip(self.down_levels, self.downsamples, strict=True):
            h = level(h, time)
            skips.append(h)
            h = downsample(h)
        h = self.middle(h, time)
        for level, upsample in zip(self.up_levels, self.upsamples, strict=True):
            h = level(torch.cat([h, skips.pop()], dim=1), time)
            h = upsample(h)
        h = self.final(torch.cat([h, first], dim=1), time)
        return self.out_conv(h)


def build_denoiser(latent_channels: int, config: LDMConfig) -> PseudoUNet3D:
    """The configured denoiser for latents with ``latent_channels`` channels."""
    return PseudoUNet3D(latent_channels, config)
