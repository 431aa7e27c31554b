"""Training: data sets (the procedural shapes data), the engine and the objectives."""
