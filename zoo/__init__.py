"""Model zoos and weight generators (later issues)."""
