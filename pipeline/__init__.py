"""Driver-side orchestration of a round: Ray Data stages over the actors, Ray Train, resume."""
