"""argparse `type=` callables for counts, seeds, devices and config names: a bad value is one argparse
line and exit 2, caught before any data is opened or any training starts."""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

__all__ = ["positive_int", "non_negative_int", "device_name", "config_file", "shipped_configs"]


def _int_at_least(lowest: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be {what} (>= {lowest}), got {value}")
        return value

    parse.__name__ = f"int >= {lowest}"  # argparse names the type in some messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "a non-negative integer")


def device_name(text: str) -> str:
    """A device name `TrainConfig.device` accepts too (one rule: `check_device_name`)."""
    from darec.train.config import check_device_name

    try:
        return check_device_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}, got {text!r}") from None


def shipped_configs() -> dict[str, Path]:
    """The run configs inside the package (`darec/configs/NAME.yaml`), by name."""
    folder = resources.files("darec") / "configs"
    return {entry.name.removesuffix(".yaml"): Path(str(entry)) for entry in folder.iterdir()
            if entry.name.endswith(".yaml")}


def config_file(text: str) -> Path:
    """`--config`: a YAML path, or the name of a shipped config (`paper`), so the shipped ones work from
    any folder and from an installed wheel. An existing file of that name wins over the shipped one."""
    path = Path(text)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    shipped = shipped_configs()
    if text in shipped:
        return shipped[text]
    raise argparse.ArgumentTypeError(f"no file {text!r} and no shipped config of that name "
                                     f"(shipped: {', '.join(sorted(shipped))})")
