"""Training: the shared `Trainer`, the stage recipes A–E, the memory plan and the training benchmark."""
