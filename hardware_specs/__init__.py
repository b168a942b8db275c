"""The device catalog: one TOML file per device, read by `costmodel.hardware`.

Installed as the package `costmodel.hardware_specs` (see pyproject.toml's package-dir); this file
only makes the folder a package so `importlib.resources` can find the TOML files.
"""
