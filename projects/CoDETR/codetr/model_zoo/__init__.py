"""codetr.model_zoo."""
