"""Email channel (issue 5)."""
