"""The channel API (what a plugin implements and gets) and the toolkit built on it."""
