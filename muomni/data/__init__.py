"""Data for μOmni: the synthetic default world, speech synthesis, indexed manifests, datasets,
collate functions and real-data converters.

Submodules import their heavy dependencies (torch, Pillow, soundfile) only where needed.
"""
