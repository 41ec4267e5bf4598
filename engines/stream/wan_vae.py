"""Continuing decode through Wan's causal video VAE: each stream session keeps the decoder's causal cache between
its chunks, so a video decoded chunk by chunk equals the same latents decoded in one call (no seams).

``AutoencoderKLWan._decode`` walks the latent frames one at a time, threading a list of cached activations
(``feat_cache``: per causal conv, its last frames; the string ``"Rep"`` marks a temporal upsampler that has seen
the first frame) through ``decoder(...)``, and clears that list before and after. Here the list is not cleared:
it is kept per session, and sessions in the same phase are decoded in one batch by stacking their lists row-wise.
This relies on the decoder's ``feat_cache``/``feat_idx``/``first_chunk`` arguments (diffusers 0.3x-0.42); the
tests decode chunk by chunk and compare with one ``vae.decode`` call, so a change there fails loudly.
"""

from __future__ import annotations

import torch

DecoderState = list  # one entry per causal conv of the decoder: None, "Rep" or a tensor [1, C, t, H, W]


def _stack(states: list[DecoderState]) -> DecoderState:
    out = []
    for entries in zip(*states):
        first = entries[0]
        if isinstance(first, torch.Tensor):
            out.append(torch.cat(entries, dim=0))
        else:
            if any(e != first for e in entries):
                raise ValueError("sessions in different decoder phases cannot share a decode batch")
            out.append(first)
    return out


def _split(state: DecoderState, n: int) -> list[DecoderState]:
    # clone: a row kept as a view would pin the whole batch's cache after the other sessions close
    return [[e[i:i + 1].clone() if isinstance(e, torch.Tensor) else e for e in state] for i in range(n)]


@torch.no_grad()
def decode_continuing(vae, z: torch.Tensor, states: list[DecoderState | None]) -> tuple[torch.Tensor, list]:
    """z: [B, C, F, h, w] VAE-space latents (de-normalised); states: per row, its cache from the previous chunk, or
    None for a session's first chunk (all rows in one phase). Returns video [B, 3, F', H, W] in [-1, 1] (F' = 1 +
    4 (F - 1) for a first chunk, else 4 F) and the rows' new states."""
    first = states[0] is None
    if any((s is None) != first for s in states):
        raise ValueError("decode_continuing: first chunks and later chunks must be decoded in separate batches")
    n_convs = vae._cached_conv_counts["decoder"]
    cache = [None] * n_convs if first else _stack(states)
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=idx, first_chunk=first and i == 0))
    out = torch.cat(outs, 2)
    if vae.config.get("patch_size") is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0), _split(cache, z.shape[0])
