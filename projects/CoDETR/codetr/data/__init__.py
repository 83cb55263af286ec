"""codetr.data."""
