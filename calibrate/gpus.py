"""A GPU profile's `device:`: the datasheet spec of the matching hardware/devices file, with
the name nvidia-smi reported. (A GPU device needs its datasheet figures; a CPU one does not.)"""

from __future__ import annotations

import re

import yaml

from simulator.hardware import HARDWARE_DIR

# nvidia-smi name pattern -> hardware/devices file; the first match wins.
_MATCH = (
    (r"H100.*PCIe", "h100-pcie"),
    (r"H100", "h100-sxm"),
    (r"H200", "h200"),
    (r"B200", "b200"),
    (r"A100.*80", "a100-80gb-sxm"),
    (r"L40S", "l40s"),
    (r"\bA40\b", "a40"),
    (r"RTX PRO 6000", "rtx-pro-6000"),
    (r"4090", "rtx4090"),
    (r"MI300X", "mi300x"),
)


class UnknownGPU(ValueError):
    pass


def gpu_device(gpu: dict) -> dict:
    name = gpu["description"]
    for pattern, stem in _MATCH:
        if re.search(pattern, name, re.I):
            spec = yaml.safe_load((HARDWARE_DIR / "devices" / f"{stem}.yaml").read_text())
            spec = {k: v for k, v in spec.items() if k != "max_gpus_per_node"}
            spec["description"] = f"{name} (spec from hardware/devices/{stem}.yaml)"
            spec["driver_memory_bytes"] = gpu.get("driver_memory_bytes")
            return spec
    raise UnknownGPU(f"no hardware/devices file matches GPU '{name}'; add one")
