"""Images in, vectors out: loading, the Vision Transformer, and CLIP-style contrastive training.

- Loading: any PIL mode (1, L, LA, P, RGBA, CMYK, 16-bit, ...) and the EXIF orientation become one
  upright RGB image; transparency is composited on white. torchvision transforms v2 resize, crop and
  normalise it; training adds mild random crops (never flips: "left" and "right" are labels here).
- `ViT` (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"): a strided convolution cuts the
  image into patches, a CLS token and learned positional embeddings are added (interpolated bicubically
  when the input size differs from the training size), then pre-norm blocks from `layers.py`.
  ``(batch, 3, height, width) -> (batch, 1 + grid_h * grid_w, d_model)``: the CLS token then every patch.
- `merge_2x2`: neighbouring 2x2 patches concatenated into one token (as in Qwen2-VL), so the Thinker
  reads a quarter as many image tokens: ``(batch, gh * gw, d) -> (batch, gh/2 * gw/2, 4 * d)``.
- `CLIP` (Radford et al., 2021): the ViT and a small text tower map images and captions into one
  space, ``(batch, embed_dim)`` unit vectors; `info_nce` is the symmetric contrastive loss with a
  learnable temperature (logit scale initialised at 1/0.07, clamped to ``max_temperature``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from muomni.config import VisionConfig
from muomni.layers import Transformer

# ImageNet channel statistics, the usual normalisation for images fed to a ViT.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 8192 * 8192  # larger images are refused before decoding (a decompression bomb guard)


class ImageError(ValueError):
    """An image file that is missing, unreadable, empty or too large."""


# ----------------------------------------------------------------------------------------------
# Loading and transforms


def load_image(source: str | Path | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file (or take a PIL image) and return it upright, in RGB.

    Raises `ImageError` (one line, naming the file) for a missing, empty, non-image, truncated,
    zero-size or oversized image. The size is checked before the pixels are decoded.
    """
    if isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        path, name = Path(source), str(source)
        if not path.is_file():
            raise ImageError(f"{name} does not exist" if not path.exists() else f"{name} is not a file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name} is empty (0 bytes); expected a PNG, JPEG or other image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name} is too large to decode safely (more than {max_pixels} pixels)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"{name} is not an image Pillow can read ({error})") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"{name} has zero size ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(f"{name} is {width}x{height} pixels, more than the limit of {max_pixels}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name} is truncated or corrupt ({error})") from None
    return to_rgb(image, name)


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Apply the EXIF orientation and convert any PIL mode to 8-bit RGB (alpha over white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion clips 16-bit values at 255; scale the full range down instead.
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and pixels.max(initial=0) > 255:
            pixels = pixels / 257.0  # 65535 -> 255
        elif image.mode == "F" and pixels.max(initial=0) <= 1.0:
            pixels = pixels * 255.0  # a float image in [0, 1]
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    try:
        if image.mode in ("P", "PA", "LA", "RGBa") or "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode == "RGBA":
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image)
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(f"{name} has mode {image.mode}, which cannot be converted to RGB ({error})") from None


def image_transform(image_size: int, train: bool = False, min_scale: float = 0.8) -> v2.Compose:
    """PIL image or uint8 tensor -> normalised float tensor ``(3, image_size, image_size)``.

    Evaluation resizes the short side and centre-crops. Training takes a random crop of at least
    ``min_scale`` of the area (nearly square) and resizes it; there is no flip and no hue change,
    because positions and colours are what the captions talk about.
    """
    if train and min_scale < 1.0:
        geometry = [v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), ratio=(0.9, 1.1), antialias=True)]
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGE_MEAN, IMAGE_STD)])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo `image_transform`'s normalisation: ``(..., 3, H, W)`` -> values in [0, 1] for display."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# Vision Transformer


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patches per column and per row, ``(grid_h, grid_w)``; the sides must divide by ``patch_size``."""
    if height % patch_size or width % patch_size or height == 0 or width == 0:
        raise ValueError(f"image of {height}x{width} pixels does not split into {patch_size}x{patch_size} "
                         "patches; resize it to a multiple of the patch size")
    return height // patch_size, width // patch_size


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def conv_stem(patch_size: int, channels: int, d_model: int) -> nn.Sequential:
    """Early convolutions in place of the patch embedding (Xiao et al., 2021, "Early Convolutions Help
    Transformers See Better"): log2(patch_size) 3x3 convolutions of stride 2, each with a per-picture
    norm and ReLU, then a 1x1 convolution: ``(batch, 3, H, W) -> (batch, d_model, H / p, W / p)``.
    Each patch then sees its neighbours' edges and corners, which is what tells a square from a circle.
    The norm is GroupNorm of one group, not batch norm: it keeps no running statistics, so a frozen
    ViT encodes a picture the same way alone or in a batch, in training mode or not."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"a conv stem halves the picture until one pixel is a patch; patch_size {patch_size} "
                         "must be a power of two")
    layers: list[nn.Module] = []
    width = 3
    for _ in range(patch_size.bit_length() - 1):
        layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.GroupNorm(1, channels), nn.ReLU()]
        width = channels
    return nn.Sequential(*layers, nn.Conv2d(channels, d_model, kernel_size=1))


class ViT(nn.Module):
    """Vision Transformer: ``(batch, 3, H, W) -> (batch, 1 + grid_h * grid_w, d_model)``.

    Token 0 is the CLS token; tokens ``1:`` are the patches in row-major order. All tokens pass
    through the final norm.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = patch_grid(cfg.image_size, cfg.image_size, cfg.patch_size)
        # A convolution whose kernel and stride are the patch size is a linear map of each patch: the
        # patch embedding of the ViT paper. With a conv stem, 3x3 convolutions of stride 2 halve the picture
        # until one pixel is one patch, and a 1x1 convolution gives each its d_model features.
        if cfg.conv_stem:
            self.patch_embed = conv_stem(cfg.patch_size, cfg.conv_stem, cfg.d_model)
        else:
            self.patch_embed = nn.Conv2d(3, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Transformer(dataclasses.replace(cfg, causal=False))
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(grid_h, grid_w)`` of an input of ``height`` x ``width`` pixels."""
        return patch_grid(height, width, self.cfg.patch_size)

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embeddings ``(1, 1 + gh * gw, d_model)``, bicubically resized from the trained grid."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)  # (1, d, gh, gw)
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positions: ``(batch, 3, H, W) -> (batch, 1 + gh * gw, d_model)``."""
        grid = self.patch_grid(images.shape[-2], images.shape[-1])
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (batch, gh * gw, d_model)
        cls = self.cls_token.expand(images.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, patches], dim=1) + self.position_embeddings(grid))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(images))


def merge_2x2(patches: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Concatenate each 2x2 block of patch tokens into one token.

    ``patches`` ``(batch, gh * gw, d)`` in row-major order (no CLS) -> ``(batch, mh * mw, 4 * d)`` and
    the merged grid ``(mh, mw) = (ceil(gh / 2), ceil(gw / 2))``. Within a token the order is
    top-left, top-right, bottom-left, bottom-right. An odd side is padded by repeating its last
    row or column, so every image size works.
    """
    batch, n, dim = patches.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"{n} patch tokens do not fill a {gh}x{gw} grid (drop the CLS token first)")
    x = patches.reshape(batch, gh, gw, dim)
    if gh % 2:
        x = torch.cat([x, x[:, -1:]], dim=1)
    if gw % 2:
        x = torch.cat([x, x[:, :, -1:]], dim=2)
    mh, mw = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(batch, mh, 2, mw, 2, dim).permute(0, 1, 3, 2, 4, 5)  # (batch, mh, mw, 2, 2, d)
    return x.reshape(batch, mh * mw, 4 * dim), (mh, mw)


# ----------------------------------------------------------------------------------------------
# Contrastive image-text model


class TextTower(nn.Module):
    """A small transformer over caption token ids: ``(batch, seq) -> (batch, d_model)``.

    Captions are ``<|bos|> text <|eos|>`` right-padded with 0. The caption vector is the state at
    the end-of-text token (``text_pool="eos"``; with causal attention it is the only token that has
    read the whole caption) or the mean over real tokens (``"mean"``).
    """

    def __init__(self, cfg: VisionConfig, vocab_size: int):
        super().__init__()
        if cfg.text_pool not in ("eos", "mean"):
            raise ValueError(f"unknown text_pool '{cfg.text_pool}'; expected 'eos' or 'mean'")
        self.pool = cfg.text_pool
        self.token_embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.text_max_len, cfg.d_model))
        self.encoder = Transformer(dataclasses.replace(cfg, n_layers=cfg.text_layers, causal=cfg.text_causal))
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask ``(batch, seq)`` (mask True on real tokens) -> ``(batch, d_model)``."""
        if ids.shape[1] > self.pos_embed.shape[1]:
            raise ValueError(f"caption of {ids.shape[1]} tokens is longer than text_max_len {self.pos_embed.shape[1]}")
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        x = self.encoder(x, key_padding_mask=mask)
        if self.pool == "mean":
            weights = mask.unsqueeze(-1).to(x.dtype)
            return (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        last = mask.long().sum(1) - 1  # index of each row's end-of-text token
        return x[torch.arange(x.shape[0], device=x.device), last]


class CLIP(nn.Module):
    """Image and text towers projected into one space of unit vectors ``(batch, embed_dim)``."""

    def __init__(self, cfg: VisionConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vision = ViT(cfg)
        self.text = TextTower(cfg, vocab_size)
        self.image_proj = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=cfg.d_model ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.d_model ** -0.5)
        # The logit scale is learned in log space (it stays positive); CLIP starts it at 1/0.07.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))
        # Linear attribute readouts of the merged patches (what the Thinker will read), one per attribute.
        self.attribute_heads = nn.ModuleList(nn.Linear(4 * cfg.d_model, n) for n in cfg.attribute_classes)

    def logit_scale(self) -> torch.Tensor:
        """exp of the learned log scale, clamped to ``max_temperature`` (no gradient beyond it)."""
        return self.log_logit_scale.exp().clamp(max=self.cfg.max_temperature)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W) -> (batch, embed_dim)`` unit vectors from the CLS token."""
        return F.normalize(self.image_proj(self.vision(images)[:, 0]), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(batch, seq) -> (batch, embed_dim)`` unit vectors."""
        return F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)

    def scores(self, states: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities ``(n_images, n_texts)`` from the ViT's output ``states``
        ``(n_images, 1 + patches, d_model)``: row i scores image i against every caption."""
        images = F.normalize(self.image_proj(states[:, 0]), dim=-1)
        return self.logit_scale() * images @ self.encode_text(ids, mask).T

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities ``(n_images, n_texts)``: row i scores image i against every caption."""
        return self.scores(self.vision(images), ids, mask)

    def attribute_logits(self, states: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Per attribute head, logits ``(n_images, mh * mw, classes)`` of every merged 2x2 token, from
        the ViT's output ``states`` ``(n_images, 1 + gh * gw, d_model)`` on a ``grid`` of patches."""
        merged, _ = merge_2x2(states[:, 1:], grid)
        return [head(merged) for head in self.attribute_heads]


def info_nce(logits: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropies.

    ``logits`` ``(n, n)`` pairs image i with caption i. ``groups`` ``(n,)`` optionally marks pairs
    whose captions are the same text: those are positives too, sharing the target probability
    equally, so a repeated caption is not pushed away from its other images.
    """
    if groups is None:
        groups = torch.arange(logits.shape[0], device=logits.device)  # every caption distinct
    same = (groups[:, None] == groups[None, :]).to(logits.dtype)
    targets = same / same.sum(1, keepdim=True)  # symmetric, so the same targets serve both directions
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def caption_ids(tokenizer, text: str, max_len: int) -> list[int]:
    """``<|bos|> tokens <|eos|>`` of a caption, cut to ``max_len`` (the end-of-text token is kept)."""
    ids = tokenizer.encode(text)[: max_len - 2]
    return [tokenizer.bos_id, *ids, tokenizer.eos_id]


def recall_at_k(similarity: torch.Tensor, captions: list[str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Retrieval recall both ways from ``similarity`` ``(n, n)`` (image i, caption i is a pair).

    Image -> text: a hit at k if any of the k best captions for image i has the same text as
    caption i (scenes may share a caption, and identical texts score identically). Text -> image:
    a hit if any of the k best images for caption i has caption i's text. Returns
    ``{"image_to_text_r1": ..., "text_to_image_r1": ..., ...}`` as fractions.
    """
    ids = {text: k for k, text in enumerate(dict.fromkeys(captions))}
    group = torch.tensor([ids[text] for text in captions], device=similarity.device)
    scores = {}
    for name, sim in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        for k in ks:
            top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (n, k)
            hits = (group[top] == group[:, None]).any(dim=1)
            scores[f"{name}_r{k}"] = hits.float().mean().item()
    return scores
