"""Pipelines: TextToVideoPipeline (plan -> encode -> sample -> decode) and what it calls (generation loop, prompts,
picture conditioning, long videos, offload), video-to-video, the DiffusionPipeline loader, checkpoint conversion.

May import: `lora`, `checkpoints`, `sampling`, `models` and the leaves."""
