"""Training and evaluating adapters on tenant tasks."""
