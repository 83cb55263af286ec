"""codetr.checkpoint."""
