"""Built-in channel plugins, importable as ``gateway_plugins.<name>``."""
