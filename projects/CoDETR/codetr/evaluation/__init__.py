"""codetr.evaluation."""
