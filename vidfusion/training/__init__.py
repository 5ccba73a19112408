"""Training: LoRA fine-tuning on clips (`train`) and its data (`data`).

May import: `pipelines` and every wing below it; not `scale`, `serve` or `cli`."""
