"""Native decode kernels (placeholder during development)."""


def available(view, q) -> bool:
    return False


def decode(q, view, spec, sinks, slopes, split_size, backend):
    raise NotImplementedError(f"{backend=} decode kernel is not built yet")
