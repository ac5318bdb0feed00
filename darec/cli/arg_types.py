"""argparse `type=` callables for counts and seeds: a bad number is one argparse line and exit 2,
caught before any data is opened or any training starts."""
from __future__ import annotations

import argparse

__all__ = ["positive_int", "non_negative_int", "device_name"]


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
