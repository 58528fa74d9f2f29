"""Perceiver resamplers (SYSTEMS.md §21 Flamingo, Idefics2) and the Idefics3 pixel-shuffle connector."""

import pytest
import torch

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors import CONNECTORS
from vlmlab.models.connectors.perceiver import PerceiverResampler
from vlmlab.models.layers import RMSNorm

D = 16


def flamingo(**kw):
    torch.manual_seed(0)
    params = dict(n_latents=64, depth=2, heads=2, dim_head=8, max_num_media=3, max_num_frames=2)
    return PerceiverResampler(D, **{**params, **kw}).eval()


@pytest.mark.parametrize("n_patches", [1, 7, 49, 200])
def test_output_has_n_latents_for_any_number_of_patches(n_patches):
    p = flamingo()
    with torch.no_grad():
        assert p(torch.randn(2, 3, 2, n_patches, D)).shape == (
            2,
            3,
            64,
            D,
        )  # [B, T, F, v, D] -> [B, T, 64, D]
        assert p(torch.randn(2, n_patches, D)).shape == (2, 64, D)


def test_flamingo_defaults_and_parts():
    p = PerceiverResampler(D)
    assert len(p.layers) == 6 and p.latents.shape == (64, D)
    attn = p.layers[0].self_attn
    assert (attn.heads, attn.head_dim, attn.q_proj.out_features) == (8, 64, 512)
    assert p.layers[0].mlp.fc1.out_features == 4 * D  # FF x4
    assert isinstance(p.norm, torch.nn.LayerNorm) and isinstance(
        p.layers[0].input_context_norm, torch.nn.LayerNorm
    )
    assert p.media_time_embs is None and p.frame_embs is None
    idefics = PerceiverResampler(D, norm="rmsnorm", ff="swiglu", latents_init="ones", kv_heads=2)
    assert isinstance(idefics.norm, RMSNorm) and torch.equal(idefics.latents, torch.ones(64, D))
    assert idefics.layers[0].self_attn.k_proj.out_features == 2 * 64  # GQA: 2 key/value heads of 64


def test_latents_attend_to_concat_of_media_and_latents():
    """K/V = concat(media, latents): the layer's attention equals attention over that concatenation, differs from
    attention over the media alone, and changing only the latents' K/V contribution (same queries, same media)
    changes it."""
    p = flamingo(depth=1, max_num_media=None, max_num_frames=None)
    layer, attn = p.layers[0], p.layers[0].self_attn
    x = torch.randn(1, 10, D)
    with torch.no_grad():
        q, media = layer.input_latents_norm(p.latents[None]), layer.input_context_norm(x)
        out = attn(q, media, None)
        torch.testing.assert_close(out, attn.o_proj(_attend_kv(attn, q, media, q)))
        assert not torch.allclose(out, attn.o_proj(_attend_kv(attn, q, media, q[:, :0])), atol=1e-4)
        other = layer.input_latents_norm(torch.randn(1, 64, D))
        assert not torch.allclose(out, attn.o_proj(_attend_kv(attn, q, media, other)), atol=1e-4)


def _attend_kv(attn, q_in, media, latents_kv):
    b, n, _ = q_in.shape
    kv = torch.cat([media, latents_kv], 1)
    q = attn.q_proj(q_in).view(b, n, attn.heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(kv).view(b, kv.shape[1], attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(kv).view(b, kv.shape[1], attn.kv_heads, attn.head_dim).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) * attn.head_dim**-0.5).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(b, n, -1)


def test_time_and_frame_embeddings_change_the_output_across_media():
    p = flamingo()
    x = torch.randn(1, 1, 2, 5, D).expand(1, 3, 2, 5, D)  # the same media at t = 0, 1, 2
    with torch.no_grad():
        out = p(x)
        assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-4)
        assert not torch.allclose(out[0, 1], out[0, 2], atol=1e-4)
        p.media_time_embs.zero_()
        out = p(x)
        torch.testing.assert_close(out[0, 0], out[0, 1])
        # Frame embeddings: the same frame content at frame 0 and 1 differs from two copies at frame 0.
        y = torch.randn(1, 1, 1, 5, D)
        two = p(torch.cat([y, y], dim=2))
        p.frame_embs.zero_()
        assert not torch.allclose(two, p(torch.cat([y, y], dim=2)), atol=1e-4)


def test_mask_hides_padded_patches():
    p = flamingo(max_num_media=None, max_num_frames=None)
    x = torch.randn(1, 6, D)
    mask = torch.tensor([[True, True, True, True, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(p(x, mask), p(x[:, :4]))
        y = x.clone()
        y[:, 4:] = 100.0
        torch.testing.assert_close(p(y, mask), p(x, mask))


def test_connectors():
    torch.manual_seed(0)
    c = CONNECTORS["perceiver"](24, 40, n_latents=16, depth=1, heads=2, dim_head=8)
    assert c.num_tokens(999) == 16 and c(torch.randn(2, 9, 24)).shape == (2, 16, 40)
    c = CONNECTORS["perceiver"](24, 40, n_latents=16, depth=1, heads=2, dim_head=8, max_num_media=2)
    assert c(torch.randn(2, 9, 24)).shape == (2, 16, 40)
    c = CONNECTORS["idefics2_perceiver"](
        24, 32, intermediate_size=48, patch_size=4, n_latents=8, depth=1, heads=4, dim_head=8, kv_heads=2
    )
    assert c.num_tokens(100) == 8
    pm = torch.ones(2, 16, 12, dtype=torch.long)
    pm[1, :, 8:] = 0  # the second view's last patch column is padding
    with torch.no_grad():
        out = c(torch.randn(2, 12, 24), pixel_attention_mask=pm)
    assert out.shape == (2, 8, 32)
    with pytest.raises(SampleError, match="pixel_attention_mask gives"):
        c(torch.randn(2, 11, 24), pixel_attention_mask=pm)
    c = CONNECTORS["idefics3"](24, 32, scale_factor=2)
    assert c.num_tokens(16) == 4 and c(torch.randn(2, 16, 24)).shape == (2, 4, 32)


def test_bad_settings_and_inputs_fail_with_one_line():
    for kw, msg in (
        (dict(norm="batchnorm"), "norm 'batchnorm'"),
        (dict(ff="tanh"), "ff 'tanh'"),
        (dict(heads=4, kv_heads=3), "multiple of kv_heads"),
        (dict(latents_init="zeros"), "latents_init"),
    ):
        with pytest.raises(ConfigError, match=msg) as e:
            PerceiverResampler(D, **kw)
        assert "\n" not in str(e.value)
    p = flamingo()
    with pytest.raises(SampleError, match=r"\[B, N, D\] or \[B, T, F, v, D\]"):
        p(torch.randn(2, 3, 4, D))
    with pytest.raises(SampleError, match="4 media, at most 3"):
        p(torch.randn(1, 4, 1, 5, D))
    with pytest.raises(SampleError, match="3 frames, at most 2"):
        p(torch.randn(1, 1, 3, 5, D))
