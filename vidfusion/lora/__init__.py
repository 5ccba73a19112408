"""LoRA: every adapter file format read into one form (`formats`), adapter state on a UNet (merge, switch, fuse,
unload: `adapters`), and loading LoRAs onto a pipeline (`apply`).

May import: `checkpoints`, `sampling`, `models` and the leaves."""
