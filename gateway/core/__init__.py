"""The gateway's core: it knows no channel. Import public names from :mod:`gateway`."""
