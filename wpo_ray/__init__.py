"""wpo-ray: difficulty-weighted preference optimization of LLMs on Ray.

The library: config, data contracts, weighting and pairing, losses, graders, tasks, generation,
evaluation, run directory, CLI. Everything arithmetic is a pure function testable without Ray.
"""

__version__ = "0.1.0"
