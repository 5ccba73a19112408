"""Networks: UNet3D, the VAE, the tiny (TAESD/TAESDV) decoders, shared layers, Winograd convolutions, the CLIP text
encoder's forward and frozen configs. No file I/O (reading checkpoints is `checkpoints/`'s job).

May import: `errors`, `devices`, `media`."""
