"""codetr.modeling."""
