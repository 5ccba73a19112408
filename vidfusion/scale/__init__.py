"""Scale: batch jobs from a JSONL/CSV file, in this process or across GPUs and machines on Ray (`batch`), and the one
Ray connection helper (`ray_cluster`).

May import: `pipelines` and every wing below it; not `training`, `serve` or `cli`."""
