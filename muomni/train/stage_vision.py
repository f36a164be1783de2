"""Stage C: the ViT learns to see by matching images with their captions (CLIP-style).

Each batch holds images and one caption of each (drawn at random from the record's captions). The
ViT and a small text tower, which reads the Thinker's tokenizer ids (stage A must have run), embed
both; the symmetric InfoNCE loss pulls matching pairs together and pushes the rest of the batch
apart. Captions that are the same text count as matching each other (`vision.info_nce` groups).

Captions alone give the ViT little reason to tell shapes apart: a caption pool is told apart by
colour, size and place long before shape matters. So where the manifest holds the scene (the world
does), stage C also trains the *attribute heads*: linear readouts of each merged 2x2 token (the very
tokens the Thinker reads) that name the colour, shape, size and 3x3 place of the object centred in
that token, or "none". Each object then sits, fully described, in one token: a question about it
becomes a lookup of one token.

Evaluation is retrieval among 100 held-out pairs, and the attribute heads' accuracy on the tokens
that hold an object: for each image, rank the 100 captions (image ->
text), and for each caption, rank the 100 images (text -> image); R@k is the fraction whose match is
in the top k. Scenes can share a caption, so a hit is any retrieved caption whose text equals the
right one. Splits larger than 100 are cut into pools of 100 and the recalls averaged.

Usage: ``muomni train --stage vision --preset tiny`` then ``muomni eval --stage vision``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from muomni.checkpoint import CheckpointError, load_checkpoint, resolve
from muomni.config import TrainConfig, VisionConfig, from_dict
from muomni.data.datasets import TensorCache
from muomni.data.index import JsonlIndex
from muomni.data.language import COLOURS, SHAPES, SIZES
from muomni.data.world import HELD_OUT
from muomni.tokenizer import Tokenizer
from muomni.train.stages import StageError, manifest, resolve_configs, run_stage, stage_checkpoint
from muomni.vision import CLIP, caption_ids, image_transform, info_nce, load_image, patch_grid, recall_at_k

STAGE = "vision"
POOL = 100  # retrieval is among this many held-out pairs
ATTRIBUTES = ("colour", "shape", "size", "place")  # what the attribute heads name, in head order

TRAIN_DEFAULTS = {
    # Muon for the blocks' matrices: image-to-text R@1 97 % on `test` and 87 % on `wild` where AdamW
    # reaches 71 and 56 % in the same 450 steps (study/07).
    "tiny": TrainConfig(steps=450, batch_size=128, lr=2e-3, min_lr_ratio=0.05, warmup_steps=40,
                        weight_decay=0.05, optimizer="muon", eval_every=100, eval_batches=1, save_every=200,
                        log_every=10),
    "base": TrainConfig(steps=6000, batch_size=256, lr=1e-3, min_lr_ratio=0.05, warmup_steps=300,
                        weight_decay=0.05, optimizer="muon", eval_every=500, eval_batches=4, save_every=500,
                        log_every=20),
}


class CaptionedImages(Dataset):
    """``images/<split>.jsonl`` as ``{"image": (3, size, size), "ids": [int], "caption": str}``.

    Training draws one of the record's captions at random and augments the image; evaluation takes
    the first caption (which names every object with its size, colour and place) and no augmentation.
    """

    def __init__(self, manifest: Path, tokenizer: Tokenizer, cfg: VisionConfig, train: bool,
                 cache_mb: float = 1024):
        self.index = JsonlIndex(manifest, required=("image", "captions"))
        self.base = manifest.parent
        self.tokenizer, self.max_len, self.train = tokenizer, cfg.text_max_len, train
        self.transform = image_transform(cfg.image_size, train=train, min_scale=cfg.augment_min_scale)
        # Decoded images are kept (uint8) up to cache_mb, so later epochs skip PNG decoding.
        self.cache = TensorCache(cache_mb)
        gh, gw = patch_grid(cfg.image_size, cfg.image_size, cfg.patch_size)
        self.merged_grid = ((gh + 1) // 2, (gw + 1) // 2)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.index[i]
        captions = record["captions"]
        if not captions:
            raise self.index.error(i, "has no captions")
        caption = captions[int(torch.randint(len(captions), ()))] if self.train else captions[0]
        objects = record.get("scene", {}).get("objects")
        return {"image": self.transform(self.pixels(i, record)),
                "ids": caption_ids(self.tokenizer, caption, self.max_len), "caption": caption,
                "attributes": attribute_targets(objects, self.merged_grid) if objects is not None else None}

    def pixels(self, i: int, record: dict) -> torch.Tensor:
        """The decoded image ``(3, H, W)`` uint8, from the cache when it is there."""
        return self.cache.get(i, lambda: pil_to_tensor(load_image(self.base / record["image"])))


def attribute_targets(objects: list[dict], grid: tuple[int, int]) -> torch.Tensor:
    """Targets ``(mh * mw, 4)`` of the attribute heads: for the merged token holding an object's centre,
    1 + the index of its colour, shape, size and 3x3 place; 0 ("none") for every other token."""
    mh, mw = grid
    targets = torch.zeros(mh * mw, len(ATTRIBUTES), dtype=torch.long)
    for obj in objects:
        token = min(int(obj["y"] * mh), mh - 1) * mw + min(int(obj["x"] * mw), mw - 1)
        targets[token] = torch.tensor([1 + COLOURS.index(obj["colour"]), 1 + SHAPES.index(obj["shape"]),
                                       1 + SIZES.index(obj["size"]), 1 + 3 * obj["row"] + obj["col"]])
    return targets


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, right-pad ids with 0 (mask True on real tokens), and number the distinct captions;
    attribute targets ``(batch, mh * mw, 4)`` when every item has them, else None."""
    longest = max(len(item["ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["ids"])] = torch.tensor(item["ids"])
    lengths = torch.tensor([len(item["ids"]) for item in items])
    texts = [item["caption"] for item in items]
    first = {text: k for k, text in reversed(list(enumerate(texts)))}  # one group id per distinct text
    attributes = [item.get("attributes") for item in items]
    return {"images": torch.stack([item["image"] for item in items]), "ids": ids,
            "mask": torch.arange(longest)[None] < lengths[:, None],
            "groups": torch.tensor([first[text] for text in texts]), "captions": texts,
            "attributes": torch.stack(attributes) if all(a is not None for a in attributes) else None}


def attribute_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the attribute heads (``logits`` per head ``(batch, tokens, classes)``,
    ``targets`` ``(batch, tokens, heads)``) and each head's accuracy on the tokens that hold an object.

    Most tokens hold no object; weighted equally they would teach little but "none". So the tokens
    that hold an object carry half the loss and the empty ones the other half.
    """
    losses, metrics = [], {}
    holds = targets[..., 0] > 0
    weight = torch.where(holds, 0.5 / holds.sum().clamp(min=1), 0.5 / (~holds).sum().clamp(min=1))
    for name, head_logits, head_targets in zip(ATTRIBUTES, logits, targets.unbind(-1)):
        each = F.cross_entropy(head_logits.flatten(0, 1), head_targets.flatten(), reduction="none")
        losses.append((each * weight.flatten()).sum())
        metrics[f"{name}_acc"] = (head_logits.argmax(-1) == head_targets)[holds].float().mean().item()
    return torch.stack(losses).mean(), metrics


def loss_fn(model: CLIP, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE of images and captions, plus ``attribute_weight`` x the attribute heads' loss."""
    images = batch["images"]
    states = model.vision(images)
    logits = model.scores(states, batch["ids"], batch["mask"])
    loss = info_nce(logits, batch["groups"])
    with torch.no_grad():  # in-batch image -> caption accuracy; a repeated caption counts as right
        picked = batch["groups"][logits.argmax(dim=1)]
        accuracy = (picked == batch["groups"]).float().mean().item()
    metrics = {"batch_acc": accuracy, "logit_scale": model.logit_scale().item(),
               "tokens": float(batch["mask"].sum() + images.shape[0] * model.vision.pos_embed.shape[1])}
    if model.attribute_heads and batch["attributes"] is not None:
        grid = model.vision.patch_grid(images.shape[-2], images.shape[-1])
        attributes, scores = attribute_loss(model.attribute_logits(states, grid), batch["attributes"])
        loss = loss + model.cfg.attribute_weight * attributes
        metrics.update(attribute_loss=attributes.item(), **scores)
    return loss, metrics


def load_tokenizer(runs_dir: Path) -> Tokenizer:
    """The Thinker's tokenizer from ``runs_dir/thinker`` (stage A), or a one-line error saying so."""
    try:
        checkpoint = stage_checkpoint(runs_dir, "thinker")
    except (StageError, CheckpointError):
        raise StageError(f"stage vision reads captions with the Thinker's tokenizer, but {runs_dir / 'thinker'} "
                         "holds no trained thinker; run `muomni train --stage thinker` first") from None
    if not (checkpoint / "tokenizer.json").is_file():
        raise StageError(f"{checkpoint} has no tokenizer.json; retrain the thinker stage")
    return Tokenizer.load(checkpoint / "tokenizer.json")


def train(preset: str, data_dir: Path, runs_dir: Path, overrides: list[str], resume: bool) -> Path:
    """Train the ViT and text tower on ``data_dir/images`` into ``runs_dir/vision``."""
    omni, train_cfg = resolve_configs(preset, TRAIN_DEFAULTS, overrides)
    cfg = omni.vision
    tokenizer = load_tokenizer(Path(runs_dir))
    train_data = CaptionedImages(manifest(data_dir, "images", "train"), tokenizer, cfg, train=True)
    val_path = Path(data_dir) / "images" / "val.jsonl"
    val_data = CaptionedImages(val_path, tokenizer, cfg, train=False) if val_path.is_file() else None
    torch.manual_seed(train_cfg.seed)
    model = CLIP(cfg, tokenizer.vocab_size)
    return run_stage(STAGE, Path(runs_dir), model, cfg, train_cfg, train_data, collate, loss_fn,
                     val_data=val_data, tokenizer=tokenizer, resume=resume, preset=preset)


def load_clip(run_dir: Path) -> tuple[CLIP, Tokenizer]:
    """The trained CLIP model (eval mode) and its tokenizer from a vision run or checkpoint directory."""
    checkpoint = resolve(run_dir)
    weights, config = load_checkpoint(checkpoint)
    cfg = from_dict(VisionConfig, {k: v for k, v in config.items() if k != "kind"})
    model = CLIP(cfg, vocab_size=weights["text.token_embed.weight"].shape[0])
    model.load_state_dict(weights)
    return model.eval(), Tokenizer.load(checkpoint / "tokenizer.json")


@torch.no_grad()
def embed_split(model: CLIP, data: CaptionedImages, batch_size: int = 100
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, float]]:
    """Image and caption embeddings ``(n, embed_dim)`` of a split, its caption texts, and the attribute
    heads' accuracy on object tokens (empty when the split has no scenes or the model no heads)."""
    images, texts, captions = [], [], []
    right: dict[str, float] = {}
    objects = 0
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        states = model.vision(batch["images"])
        images.append(F.normalize(model.image_proj(states[:, 0]), dim=-1))
        texts.append(model.encode_text(batch["ids"], batch["mask"]))
        captions += batch["captions"]
        if model.attribute_heads and batch["attributes"] is not None:
            grid = model.vision.patch_grid(*batch["images"].shape[-2:])
            n = int((batch["attributes"][..., 0] > 0).sum())
            _, scores = attribute_loss(model.attribute_logits(states, grid), batch["attributes"])
            for name, value in scores.items():
                right[name] = right.get(name, 0.0) + value * n
            objects += n
    attributes = {name: value / objects for name, value in right.items()} if objects else {}
    return torch.cat(images), torch.cat(texts), captions, attributes


def retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str],
              pool: int = POOL) -> dict[str, float]:
    """R@1 and R@5 both ways, averaged over consecutive pools of ``pool`` pairs (a short tail is dropped)."""
    n_pools = max(1, len(captions) // pool)
    sums: dict[str, float] = {}
    for k in range(n_pools):
        part = slice(k * pool, (k + 1) * pool)
        scores = recall_at_k(image_emb[part] @ text_emb[part].T, captions[part], ks=(1, 5))
        for key, value in scores.items():
            sums[key] = sums.get(key, 0.0) + value / n_pools
    return {**sums, "pairs": min(len(captions), n_pools * pool), "pool": min(pool, len(captions))}


def evaluate(runs_dir: Path, data_dir: Path) -> dict:
    """Retrieval R@1/R@5 (image -> text and text -> image) and the attribute heads' accuracy on object
    tokens, per held-out split (test, comp, wild)."""
    model, tokenizer = load_clip(Path(runs_dir) / STAGE)
    results = {}
    for split in HELD_OUT:
        path = Path(data_dir) / "images" / f"{split}.jsonl"
        if path.is_file():
            data = CaptionedImages(path, tokenizer, model.cfg, train=False)
            image_emb, text_emb, captions, attributes = embed_split(model, data)
            results[split] = {**retrieval(image_emb, text_emb, captions),
                              **({"attributes": attributes} if attributes else {})}
    if not results:
        raise StageError(f"no held-out images in {Path(data_dir) / 'images'} (expected test.jsonl or comp.jsonl)")
    return results
