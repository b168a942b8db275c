"""Hardware: the device catalog (hardware_specs/), the roofline time model (no torch), calibration
of this machine, and the interconnect and collectives model."""

from costmodel.hardware.catalog import (DTYPES, Hardware, canonical_dtype, hardware_from_dict, list_hardware,  # noqa: E402,F401
                                        load_hardware, parse_hardware_list)
