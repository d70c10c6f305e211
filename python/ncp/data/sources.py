"""``build_source``: the configured loader backend, on the one contract (:mod:`ncp.data.contract`).

This module imports the backends; they import only the contract, never this module.
"""
from __future__ import annotations

from ncp.data.cache.read import CachedPairSource
from ncp.data.contract import PairSource
from ncp.data.options import LoaderOptions
from ncp.data.torch_source import TorchPairSource

def build_source(options: LoaderOptions, model_path: str | None = None) -> PairSource:
    """The configured backend: the latent cache when ``options.cache_dir`` is set (checked against
    ``model_path`` and the data settings: a mismatch is named, never used), else the Rust loader or the
    torch + PIL baseline."""
    if options.cache_dir:
        return CachedPairSource.from_options(options, model_path)
    if options.backend == "rust":
        try:
            from ncp.data.rust import RustPairSource  # the wheel is optional: data.backend=torch runs without it
        except ImportError as err:
            raise ImportError(f"data.backend=rust needs the ncp_dataloader wheel ({err}); build it with "
                              f"`bash scripts/setup.sh` or choose data.backend=torch") from err
        return RustPairSource.from_options(options)
    return TorchPairSource.from_options(options)
