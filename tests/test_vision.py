"""Vision: image loading in every PIL mode, transforms, the ViT (against torchvision), merging, CLIP."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from muomni.config import VisionConfig
from muomni.vision import (
    CLIP, ImageError, TextTower, ViT, caption_ids, image_transform, info_nce, load_image, merge_2x2, patch_grid,
    recall_at_k,
)

CFG = VisionConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, image_size=32, patch_size=8,
                   embed_dim=16, text_layers=1, text_max_len=12)


# ----------------------------------------------------------------------------------------------
# ViT


def test_a_conv_stem_gives_one_token_per_patch_and_encodes_a_picture_alone_as_in_a_batch():
    torch.manual_seed(0)
    vit = ViT(dataclasses.replace(CFG, conv_stem=8))
    images = torch.randn(3, 3, 32, 32)
    batched = vit(images)
    assert batched.shape == (3, 1 + 16, CFG.d_model)
    vit.eval()  # a frozen ViT runs in eval mode: the stem's norm must not care
    assert torch.allclose(vit(images[1:2])[0], batched[1], atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        ViT(dataclasses.replace(CFG, conv_stem=8, patch_size=6, image_size=36))


def test_vit_returns_cls_and_every_patch():
    vit = ViT(CFG)
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 4 * 4, 32)
    assert vit.patch_grid(32, 48) == (4, 6) == patch_grid(32, 48, 8)
    with pytest.raises(ValueError, match="does not split into 8x8 patches"):
        vit(torch.randn(1, 3, 30, 32))


def test_patch_embedding_is_a_linear_map_of_each_patch():
    vit = ViT(CFG)
    images = torch.randn(2, 3, 32, 32)
    patches = F.unfold(images, kernel_size=8, stride=8).transpose(1, 2)  # (batch, 16, 3 * 8 * 8)
    by_hand = patches @ vit.patch_embed.weight.flatten(1).T + vit.patch_embed.bias
    expected = by_hand + vit.pos_embed[:, 1:]
    torch.testing.assert_close(vit.embed(images)[:, 1:], expected)


def test_positional_embeddings_interpolate_to_new_grids():
    vit = ViT(CFG)
    assert vit.position_embeddings((4, 4)) is vit.pos_embed
    bigger = vit.position_embeddings((6, 8))
    assert bigger.shape == (1, 1 + 48, 32)
    torch.testing.assert_close(bigger[:, :1], vit.pos_embed[:, :1])  # CLS keeps its embedding
    with torch.no_grad():  # a position-independent embedding must stay the same at any size
        vit.pos_embed[:, 1:] = vit.pos_embed[:, 1:2]
    torch.testing.assert_close(vit.position_embeddings((6, 8))[:, 1:], vit.pos_embed[:, 1:2].expand(1, 48, 32))
    assert vit(torch.randn(1, 3, 48, 64)).shape == (1, 1 + 48, 32)


def torchvision_copy(vit: ViT, cfg: VisionConfig) -> torchvision.models.VisionTransformer:
    """A torchvision ViT of the same config holding ``vit``'s weights."""
    ref = torchvision.models.VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_layers=cfg.n_layers, num_heads=cfg.n_heads,
        hidden_dim=cfg.d_model, mlp_dim=cfg.d_ff)
    with torch.no_grad():
        ref.conv_proj.load_state_dict(vit.patch_embed.state_dict())
        ref.class_token.copy_(vit.cls_token)
        ref.encoder.pos_embedding.copy_(vit.pos_embed)
        for ours, theirs in zip(vit.encoder.blocks, ref.encoder.layers):
            theirs.ln_1.load_state_dict(ours.attn_norm.state_dict())
            theirs.self_attention.in_proj_weight.copy_(ours.attn.qkv.weight)
            theirs.self_attention.in_proj_bias.copy_(ours.attn.qkv.bias)
            theirs.self_attention.out_proj.load_state_dict(ours.attn.out.state_dict())
            theirs.ln_2.load_state_dict(ours.mlp_norm.state_dict())
            theirs.mlp[0].load_state_dict(ours.mlp.up.state_dict())
            theirs.mlp[3].load_state_dict(ours.mlp.down.state_dict())
        ref.encoder.ln.load_state_dict(vit.encoder.norm.state_dict())
    return ref.eval()


def test_vit_matches_torchvision_with_the_same_weights():
    torch.manual_seed(0)
    vit = ViT(CFG).eval()
    ref = torchvision_copy(vit, CFG)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = ref._process_input(images)
        tokens = torch.cat([ref.class_token.expand(3, -1, -1), tokens], dim=1)
        expected = ref.encoder(tokens)
        ours = vit(images)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    # and through torchvision's own classification head on the CLS token
    with torch.no_grad():
        torch.testing.assert_close(ref.heads(ours[:, 0]), ref(images), atol=1e-5, rtol=1e-4)


def test_merge_2x2_concatenates_neighbours():
    grid = torch.arange(4 * 6).float().view(1, 24, 1)  # patch value = its row-major index
    merged, merged_grid = merge_2x2(grid, (4, 6))
    assert merged.shape == (1, 6, 4) and merged_grid == (2, 3)
    assert merged[0, 0].tolist() == [0, 1, 6, 7]  # top-left block: (0,0) (0,1) (1,0) (1,1)
    assert merged[0, 4].tolist() == [14, 15, 20, 21]  # second block row, middle block
    odd, odd_grid = merge_2x2(torch.arange(9).float().view(1, 9, 1), (3, 3))
    assert odd_grid == (2, 2) and odd[0, 3].tolist() == [8, 8, 8, 8]  # corner repeated into the pad
    with pytest.raises(ValueError, match="drop the CLS token"):
        merge_2x2(torch.zeros(1, 17, 2), (4, 4))


# ----------------------------------------------------------------------------------------------
# Contrastive model


def test_info_nce_is_symmetric_and_prefers_matching_pairs():
    logits = torch.randn(6, 6)
    torch.testing.assert_close(info_nce(logits), info_nce(logits.T))
    targets = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    torch.testing.assert_close(info_nce(logits), expected)
    assert info_nce(10 * torch.eye(6)) < 0.01 < info_nce(torch.zeros(6, 6))


def test_info_nce_treats_repeated_captions_as_positives():
    # pairs 0 and 1 share a caption text, so which of the two goes with which image cannot matter
    logits = torch.randn(4, 4)
    swapped = logits[:, [1, 0, 2, 3]]
    groups = torch.tensor([7, 7, 3, 5])
    torch.testing.assert_close(info_nce(swapped, groups), info_nce(logits, groups))
    assert not torch.allclose(info_nce(swapped), info_nce(logits))  # plain InfoNCE would care
    torch.testing.assert_close(info_nce(logits, groups), info_nce(logits.T, groups))


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped():
    model = CLIP(CFG, vocab_size=50)
    assert math.isclose(model.logit_scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    scale = model.logit_scale()
    assert scale.item() == pytest.approx(CFG.max_temperature)
    scale.backward()
    assert model.log_logit_scale.grad.item() == 0.0  # clamped: no push further up


def test_clip_gives_unit_vectors_and_square_logits():
    model = CLIP(CFG, vocab_size=50)
    ids = torch.randint(8, 50, (3, 7))
    logits = model(torch.randn(3, 3, 32, 32), ids, torch.ones(3, 7, dtype=torch.bool))
    assert logits.shape == (3, 3)
    torch.testing.assert_close(model.encode_image(torch.randn(2, 3, 32, 32)).norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("causal,pool", [(True, "eos"), (False, "eos"), (False, "mean"), (True, "mean")])
def test_text_tower_ignores_padding(causal, pool):
    tower = TextTower(dataclasses.replace(CFG, text_causal=causal, text_pool=pool), vocab_size=50).eval()
    ids = torch.tensor([[1, 20, 21, 22, 2]])
    padded = torch.tensor([[1, 20, 21, 22, 2, 0, 0]])
    short = tower(ids, torch.ones_like(ids, dtype=torch.bool))
    long = tower(padded, padded != 0)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-4)


def test_recall_counts_a_repeated_caption_as_a_hit():
    captions = ["a red star.", "a red star.", "a blue circle.", "a green square."]
    similarity = torch.tensor([
        [0.5, 0.9, 0.3, 0.0],  # image 0 prefers caption 1: the same text as its own, so a hit
        [0.2, 0.9, 0.0, 0.1],
        [0.0, 0.1, 0.2, 0.9],  # image 2 prefers the wrong caption: a miss at 1, a hit at 2
        [0.0, 0.0, 0.0, 0.8],
    ])
    scores = recall_at_k(similarity, captions, ks=(1, 2))
    assert scores["image_to_text_r1"] == 0.75 and scores["image_to_text_r2"] == 1.0
    # captions 0 and 1 find a red-star image; caption 2 ranks image 0 first, caption 3 image 2: misses
    assert scores["text_to_image_r1"] == 0.5


def test_caption_ids_keep_the_end_of_text_token():
    class Letters:  # one id per character
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(c) for c in text]

    assert caption_ids(Letters(), "ab", 10) == [1, 97, 98, 2]
    assert caption_ids(Letters(), "abcdefgh", 5) == [1, 97, 98, 99, 2]


# ----------------------------------------------------------------------------------------------
# Loading and transforms


def half_red_half_blue(size=(8, 6)) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


@pytest.mark.parametrize("mode,make,suffix,expected", [
    ("L", lambda: Image.new("L", (4, 4), 200), ".png", (200, 200, 200)),
    ("1", lambda: Image.new("1", (4, 4), 1), ".png", (255, 255, 255)),
    ("LA", lambda: Image.new("LA", (4, 4), (0, 0)), ".png", (255, 255, 255)),  # transparent -> white
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), ".png", (255, 0, 0)),
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), ".png", (255, 255, 255)),
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), ".png", (127, 127, 127)),
    ("P", lambda: Image.new("RGB", (4, 4), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE), ".png",
     (0, 128, 0)),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), ".tiff", (255, 0, 0)),
    ("I;16", lambda: Image.new("I;16", (4, 4), 65535), ".png", (255, 255, 255)),
    ("I;16", lambda: Image.new("I;16", (4, 4), 32896), ".png", (128, 128, 128)),
])
def test_every_pil_mode_loads_as_rgb(tmp_path, mode, make, suffix, expected):
    image = make()
    assert image.mode == mode
    path = tmp_path / f"x{suffix}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (4, 4)
    assert all(abs(a - b) <= 1 for a, b in zip(loaded.getpixel((1, 1)), expected))


def test_palette_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.info["transparency"] = 0
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.getpixel((0, 0)) == (255, 0, 0) and loaded.getpixel((2, 2)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = half_red_half_blue((8, 6))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rot.png", exif=exif)
    loaded = load_image(tmp_path / "rot.png")
    assert loaded.size == (6, 8)
    assert loaded.getpixel((3, 0)) == (255, 0, 0) and loaded.getpixel((3, 7)) == (0, 0, 255)  # red on top


def test_bad_images_raise_one_line_errors(tmp_path):
    with pytest.raises(ImageError, match="missing.png does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not an image at all")
    with pytest.raises(ImageError, match="text.png is not an image Pillow can read"):
        load_image(tmp_path / "text.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png is truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="full.png is 64x64 pixels, more than the limit of 1000"):
        load_image(tmp_path / "full.png", max_pixels=1000)
    with pytest.raises(ImageError, match=r"zero size \(0x5 pixels\)"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path)
    assert issubclass(ImageError, ValueError)  # the CLI prints ValueErrors as one line


def test_transforms_resize_normalise_and_never_flip():
    image = half_red_half_blue((80, 64))
    evaluated = image_transform(32)(image)
    assert evaluated.shape == (3, 32, 32) and evaluated.dtype == torch.float32
    train = image_transform(32, train=True, min_scale=0.8)
    torch.manual_seed(0)
    for _ in range(20):
        x = train(image)
        assert x.shape == (3, 32, 32)
        assert x[0, :, :4].mean() > x[2, :, :4].mean()  # the left edge stays red
        assert x[2, :, -4:].mean() > x[0, :, -4:].mean()  # the right edge stays blue


# ----------------------------------------------------------------------------------------------
# Stage C end to end on a toy world


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 235), "yellow": (235, 215, 40)}


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    """A few 32 px images of one coloured square each, and a fake thinker run holding a tokenizer."""
    import json
    import random

    from muomni.checkpoint import save_checkpoint
    from muomni.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("stage")
    (root / "world/images/png").mkdir(parents=True)
    rng, number, captions = random.Random(0), 0, []
    for split, count in (("train", 24), ("val", 8), ("test", 8), ("comp", 8)):
        with open(root / f"world/images/{split}.jsonl", "w") as manifest:
            for _ in range(count):
                number += 1
                colour, side = rng.choice(list(COLOURS)), rng.choice(["left", "right"])
                image = Image.new("RGB", (32, 32), (30, 30, 30))
                image.paste(COLOURS[colour], (2 if side == "left" else 18, 10, 14 if side == "left" else 30, 22))
                image.save(root / f"world/images/png/{number:03d}.png")
                caption = f"a {colour} square on the {side}."
                captions.append(caption)
                scene = {"objects": [{"shape": "square", "colour": colour, "size": "big", "row": 1,
                                      "col": 0 if side == "left" else 2, "x": 0.25 if side == "left" else 0.75, "y": 0.5}]}
                manifest.write(json.dumps({"id": str(number), "image": f"png/{number:03d}.png",
                                           "captions": [caption, f"there is a {colour} square."], "scene": scene}) + "\n")
    tokenizer = Tokenizer.train(captions * 3, vocab_size=300)
    save_checkpoint(root / "runs/thinker/best", {"unused": torch.zeros(1)}, {"kind": "thinker"}, tokenizer=tokenizer)
    return root


SMALL = ["vision.image_size=32", "vision.d_model=32", "vision.n_layers=1", "vision.d_ff=64", "vision.embed_dim=16",
         "vision.text_layers=1", "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=2"]


def test_stage_trains_and_reports_retrieval_both_ways(toy_world):
    import json

    from muomni.train import stage_vision

    run = stage_vision.train("tiny", toy_world / "world", toy_world / "runs", SMALL, resume=False)
    assert (run / "best/model.safetensors").is_file() and (run / "last/tokenizer.json").is_file()
    assert json.loads((run / "run.json").read_text())["finished"] is True
    results = stage_vision.evaluate(toy_world / "runs", toy_world / "world")
    assert set(results) == {"test", "comp"}
    for split in results.values():
        assert split["pool"] == 8 and split["pairs"] == 8
        assert set(split["attributes"]) == {"colour_acc", "shape_acc", "size_acc", "place_acc"}
        assert all(0.0 <= value <= 1.0 for value in split["attributes"].values())
        for key in ("image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5"):
            assert 0.0 <= split[key] <= 1.0
        assert split["image_to_text_r5"] >= split["image_to_text_r1"]
    model, _ = stage_vision.load_clip(run)
    assert model.cfg.d_model == 32 and model.vision(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 32)


def test_stage_without_a_thinker_says_to_train_it_first(toy_world, tmp_path):
    from muomni.train import stage_vision
    from muomni.train.stages import StageError

    with pytest.raises(StageError, match="run `muomni train --stage thinker` first"):
        stage_vision.train("tiny", toy_world / "world", tmp_path / "runs", SMALL, resume=False)


def test_attribute_targets_name_the_object_in_the_token_that_holds_its_centre():
    from muomni.train.stage_vision import attribute_targets

    objects = [{"shape": "star", "colour": "blue", "size": "small", "row": 0, "col": 2, "x": 0.9, "y": 0.1},
               {"shape": "circle", "colour": "red", "size": "big", "row": 2, "col": 0, "x": 0.2, "y": 0.8}]
    targets = attribute_targets(objects, (4, 4))
    assert targets.shape == (16, 4)
    assert targets[3].tolist() == [1 + 2, 1 + 3, 1 + 1, 1 + 2]  # blue, star, small, top right
    assert targets[12].tolist() == [1 + 0, 1 + 0, 1 + 0, 1 + 6]  # red, circle, big, bottom left
    assert int((targets != 0).any(-1).sum()) == 2  # every other token names no object


def test_attribute_heads_read_merged_patches():
    model = CLIP(CFG, vocab_size=50)
    states = model.vision(torch.randn(2, 3, 32, 32))
    logits = model.attribute_logits(states, model.vision.grid)
    mh, mw = (model.vision.grid[0] + 1) // 2, (model.vision.grid[1] + 1) // 2
    assert [tuple(x.shape) for x in logits] == [(2, mh * mw, n) for n in CFG.attribute_classes]
    off = CLIP(dataclasses.replace(CFG, attribute_classes=()), vocab_size=50)
    assert len(off.attribute_heads) == 0
