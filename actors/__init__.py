"""Ray actors: each hosts one heavy resource and calls pure functions from `wpo_ray`."""
