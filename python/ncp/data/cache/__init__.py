"""The latent cache, a loader backend: every pair encoded once by the VAE, every prompt once by the text encoder(s).

``python -m ncp.cache --model M --sources S... --out DIR --resolution R [--flip]``
reads the pairs with the Rust loader (index order, center crop), stores the VAE
posterior (mean, logvar) of winner and loser (and of their mirror images with
``--flip``) and the text embeddings of each distinct caption, in mmap-able
safetensors shards plus ``index.json``. Training then reads batches with
:class:`CachedPairSource` without decoding an image or running an encoder.

A cache is only valid for what went into it. Its key holds the VAE and text
encoder identity (config and weight hashes) and dtype, the resolution, the
crop, the flip, the selection rules and every source file (size); each pair
keeps the content hash of its two images. :func:`check_cache` compares a key with
the run's settings (``deep=True`` re-hashes every image) and raises
:class:`StaleCacheError` naming what differs; a cache is never used silently
against other settings.

A cache is only used whole. The index holds the size and xxh3 hash of every
other file; :func:`verify_files` (run when training opens the cache, and by
``--check``) raises :class:`CorruptCacheError` naming a missing, truncated or
changed file. A build writes into ``.DIR.tmp-PID`` beside DIR and moves it in
place when complete; an existing cache is replaced only with ``--overwrite``.

Layout of DIR::

    index.json                   format, key, shapes, shard lists, counts, skipped pairs, files (size, xxh3)
    captions.json                the distinct captions, by caption id
    pairs-00000.safetensors      per pair (shard_size rows): latents (n, F, 2, 2, C, h, w) =
                                 (pair, flip, winner/loser, mean/logvar, ...), caption_ids, valid,
                                 original_sizes, crop_top_left, image_hashes (n, 2); unpaired data
                                 (``--format unpaired``, key data_format): latents (n, F, 1, 2, C, h, w),
                                 image_hashes (n, 1) and desirable (n,) uint8
    embeds-00000.safetensors     per caption: prompt_embeds (m, L, D) [, pooled_prompt_embeds (m, D2)]
    empty.safetensors            the empty prompt's embeddings (empty-prompt dropout)
"""
from ncp.data.cache.key import (FORMAT, CorruptCacheError, StaleCacheError, cache_key, check_cache, read_index,
                                verify_files)
from ncp.data.cache.read import CachedPairSource
from ncp.data.cache.write import CacheTargetError, build_cache, main

__all__ = ["FORMAT", "CacheTargetError", "CachedPairSource", "CorruptCacheError", "StaleCacheError", "build_cache",
           "cache_key", "check_cache", "main", "read_index", "verify_files"]
