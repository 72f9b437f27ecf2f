"""Entry points: `python -m jobs.<verb>` (for `ray job submit`) and the `wpo-ray` CLI (`jobs.cli`)."""
