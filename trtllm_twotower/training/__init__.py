"""Training of the small demo model (corpus, objectives, the resumable training loop)."""
