"""Fixed values every part of μOmni agrees on, defined once.

- The tokenizer's special tokens and their ids (every checkpoint uses the same ones).
- ``IGNORE_INDEX``: a target that adds nothing to a loss (PyTorch's cross-entropy default).
- The media kinds a chat part can be.
- ``CTC_ALPHABET``: the characters the AuT transcribes and the Talker's spelling head spells.
"""

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>",
                  "<|image|>", "<|audio|>", "<|video|>")
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID, IMAGE_ID, AUDIO_ID, VIDEO_ID = range(len(SPECIAL_TOKENS))
IGNORE_INDEX = -100  # targets with this value add nothing to the loss
MEDIA_KINDS = ("image", "audio", "video")
CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # lowercase letters, space and apostrophe (blank is 0)
