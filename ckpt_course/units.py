"""Bytes and FLOPs formatted in one place, so every table and message reads the same; and the
API's counts checked in one place, so every bad number gets the same clear error."""

KiB, MiB, GiB = 1024, 1024**2, 1024**3


def fmt_bytes(n: float) -> str:
    """1048576 -> '1.00 MiB'. Binary units, as the CUDA allocator reports them."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


def fmt_flops(n: float) -> str:
    """2.5e9 -> '2.50 GFLOP'. Decimal units, as FLOP counts are usually quoted."""
    for unit, size in (
        ("PFLOP", 1e15),
        ("TFLOP", 1e12),
        ("GFLOP", 1e9),
        ("MFLOP", 1e6),
        ("kFLOP", 1e3),
    ):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} FLOP"


def shown(value) -> str:
    """``repr(value)`` for a message: short (a 10**5000 is "a 16610-bit number", which repr
    could not even print), at most 60 characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"
    text = " ".join(repr(value).split())  # one line: a module's repr spans many
    return text if len(text) <= 60 else text[:57] + "..."


def check_positive_int(name: str, value) -> int:
    """For the API: ``value`` must be a whole number >= 1 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} is a whole number >= 1, got {shown(value)}: pass an int such "
                        f"as 8")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {shown(value)}: pass a positive number such "
                         f"as 8")
    return value
