"""Training orchestrator for LLaMA-family models: config schema, layout
planning, launch, training loop and everything around it."""
