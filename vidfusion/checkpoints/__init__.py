"""Checkpoints: choosing the layout (diffusers folder or original ModelScope files), the one state-file reader, the
one hub helper, strict building of the models, key naming between formats, published constants, random checkpoints
in the published layout.

May import: `sampling`, `models` and the leaves."""
