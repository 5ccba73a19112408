"""HTTP service: durable job queue (jobs.py), device workers (worker.py), REST API (app.py), web UI (ui.py)."""
