"""Entry points: `python -m jobs.<entry> --config ...` (for `ray job submit`) and the CLI's verbs."""
