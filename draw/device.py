"""The one reading of a --device flag: auto, cpu, cuda or cuda:N, checked against this machine.

torch is imported only when a device is picked, so `draw --help` can check a flag's form without it.
"""


def is_device_name(name: str) -> bool:
    """True for "cpu", "cuda" and "cuda:N" (the form alone; pick_device checks the machine)."""
    return name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


def pick_device(name: str | None = None):
    """The torch.device that `name` selects: None or "auto" is CUDA when available, else the CPU;
    "cpu", "cuda" or "cuda:N" must exist on this machine. Raises ValueError, in one line, otherwise."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not is_device_name(name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
