"""The HTTP service: durable job queue (`jobs`), device workers (`worker`, `render`), Ray actor pool
(`ray_workers`), REST API (`app`), web UI (`ui`), start-up (`launch`).

May import: `scale`, `pipelines` and every wing below them; not `training` or `cli`."""
