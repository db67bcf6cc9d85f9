"""The bridge: exact no-op when untrained, bounded once open, gradients everywhere, alignment, persistence, size."""

from dataclasses import replace

import pytest
import torch
from helpers import make_image

from bridgecore.model.bridge import (
    BridgeConfig,
    VisionCacheBridge,
    create_default_bridge,
    mean_token_cosine,
    negative_prompt_embeds,
    resample_vision_tokens,
)

PROMPT = "move the red square to the right"


@pytest.fixture(scope="module")
def caches(extractor):
    images = [make_image(200, 120, 0), make_image(96, 160, 1), make_image(300, 300, 2)]
    return extractor.extract(images, [PROMPT, "make it blue", "a longer instruction for the third sample"])


def _open(bridge, value=0.5):
    with torch.no_grad():
        bridge.gate.fill_(value)
    return bridge


@pytest.mark.parametrize("attention_fusion", [True, False])
def test_untrained_bridge_is_the_baseline_bit_for_bit(caches, attention_fusion):
    sample = caches[0]
    bridge = create_default_bridge(sample.qwen3, sample.qwen25, mode="residual", use_attention_fusion=attention_fusion)
    out = bridge(sample.qwen3, sample.qwen25)
    assert torch.equal(out.prompt_embeds[0], sample.qwen25.prompt_embeds)
    assert out.prompt_embeds.dtype == sample.qwen25.prompt_embeds.dtype


def test_gradients_reach_every_parameter_once_the_gate_is_open(caches):
    sample = caches[0]
    closed = create_default_bridge(sample.qwen3, sample.qwen25, mode="residual", use_deepstack=True)
    closed(sample.qwen3, sample.qwen25).prompt_embeds.pow(2).sum().backward()
    assert closed.gate.grad.abs().sum() > 0  # the gate learns first
    assert closed.out.weight.grad.abs().sum() == 0  # nothing else moves until it opens
    bridge = _open(create_default_bridge(sample.qwen3, sample.qwen25, mode="residual", use_deepstack=True))
    bridge(sample.qwen3, sample.qwen25).prompt_embeds.pow(2).sum().backward()
    for name, parameter in bridge.named_parameters():
        if name == "fusion.score.bias":  # added to every level's score, so the softmax over levels cancels it:
            continue  # its gradient is 0 in exact arithmetic (float noise made it pass now and then)
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_correction_cannot_erase_the_base_even_when_forced(caches, ratio):
    """Gates wide open and the output layer scaled 1000x: every token's correction stays below `ratio` of the
    token's own RMS, so each token keeps cosine >= sqrt(1 - ratio^2) with the embedding it corrects."""
    sample = caches[2]
    bridge = create_default_bridge(sample.qwen3, sample.qwen25, mode="residual", max_correction_ratio=ratio)
    with torch.no_grad():
        bridge.gate.fill_(20.0)
        bridge.out.weight.mul_(1000.0)
        bridge.out.bias.fill_(1000.0)  # the same huge vector for every token: the old failure mode
    base = sample.qwen25.prompt_embeds.float()
    enhanced = bridge(sample.qwen3, sample.qwen25).prompt_embeds[0].float()
    token_ratio = (enhanced - base).pow(2).mean(-1).sqrt() / base.pow(2).mean(-1).sqrt()
    assert token_ratio.max() <= ratio * 1.001 and token_ratio.min() > 0.9 * ratio  # saturated at, not past, the bound
    cosine = torch.nn.functional.cosine_similarity(enhanced, base, dim=-1)
    assert cosine.min() >= (1 - ratio**2) ** 0.5 - 1e-4
    stats = bridge.correction_statistics(sample.qwen3, sample.qwen25)
    assert stats["correction_rms_ratio_token_max"] <= ratio * 1.001
    assert stats["token_cosine_enhanced"] < 0.99  # tokens are not collapsed into one vector
    assert stats["gate_text"] == pytest.approx(ratio) and stats["gate_vision"] == pytest.approx(ratio)


def test_statistics_of_an_untrained_bridge(caches):
    sample = caches[0]
    stats = create_default_bridge(sample.qwen3, sample.qwen25, mode="residual").correction_statistics(
        [c.qwen3 for c in caches], [c.qwen25 for c in caches])
    assert stats["correction_rms_ratio"] == 0 and stats["gate_text"] == stats["gate_vision"] == 0
    assert stats["token_cosine_enhanced"] == pytest.approx(stats["token_cosine_base"])
    assert mean_token_cosine(torch.ones(5, 8)) == pytest.approx(1.0)
    assert mean_token_cosine(torch.eye(6)) == pytest.approx(0.0)


def test_one_gate_per_stream(caches):
    """Opening only the vision gate changes only the vision positions; only the text gate, only the text."""
    sample = caches[0]
    base = sample.qwen25.prompt_embeds
    vision = torch.zeros(base.shape[0], dtype=torch.bool)
    vision[sample.qwen25.vision_positions] = True
    for stream, changed in ((0, ~vision), (1, vision)):
        bridge = create_default_bridge(sample.qwen3, sample.qwen25, mode="residual")
        with torch.no_grad():
            bridge.gate[stream] = 1.0
        out = bridge(sample.qwen3, sample.qwen25).prompt_embeds[0]
        assert torch.equal(out[~changed], base[~changed])
        assert not torch.equal(out[changed], base[changed])


def test_negative_branch_is_not_bridged(caches):
    embeds = negative_prompt_embeds([c.qwen25 for c in caches[:2]])
    assert torch.equal(embeds.prompt_embeds[0, : caches[0].qwen25.prompt_embeds.shape[0]], caches[0].qwen25.prompt_embeds)
    assert embeds.prompt_embeds_mask[1].sum() == caches[1].qwen25.prompt_embeds.shape[0]


def test_open_bridge_changes_the_embeddings(caches):
    sample = caches[0]
    bridge = _open(create_default_bridge(sample.qwen3, sample.qwen25, mode="residual"))
    out = bridge(sample.qwen3, sample.qwen25, return_attention_weights=True)
    assert not torch.equal(out.prompt_embeds[0], sample.qwen25.prompt_embeds)
    maps = out.attention_weights[0]
    assert maps["cross_attention"].shape == (sample.qwen25.prompt_embeds.shape[0], sample.qwen3.input_ids.numel())
    torch.testing.assert_close(maps["cross_attention"].sum(-1), torch.ones(maps["cross_attention"].shape[0]))


def test_batch_equals_one_by_one(caches):
    bridge = _open(create_default_bridge(caches[0].qwen3, caches[0].qwen25, mode="residual")).eval()
    batch = bridge([c.qwen3 for c in caches], [c.qwen25 for c in caches])
    for b, cache in enumerate(caches):
        single = bridge(cache.qwen3, cache.qwen25).prompt_embeds[0]
        length = single.shape[0]
        torch.testing.assert_close(batch.prompt_embeds[b, :length], single)
        assert batch.prompt_embeds_mask[b].sum() == length and batch.prompt_embeds[b, length:].abs().sum() == 0


@pytest.mark.parametrize("grid3, grid25", [((1, 14, 22), (1, 6, 10)), ((1, 16, 16), (1, 20, 20)),
                                           ((1, 8, 30), (1, 10, 36))])
def test_resampling_keeps_the_2d_layout(grid3, grid25):
    """A horizontal ramp over the Qwen3 grid stays a horizontal ramp on the Qwen2.5 grid."""
    _, h3, w3 = (g // 2 if i else g for i, g in enumerate(grid3))
    _, h25, w25 = (g // 2 if i else g for i, g in enumerate(grid25))
    ramp = torch.linspace(0, 1, w3).repeat(h3, 1).reshape(-1, 1)
    out = resample_vision_tokens(ramp, torch.tensor([grid3]), torch.tensor([grid25])).reshape(h25, w25)
    assert out.shape == (h25, w25)
    assert (out.diff(dim=1) >= -1e-6).all() and torch.allclose(out[0], out[-1])


def test_multi_image_alignment(plus_extractor):
    cache = plus_extractor.extract([make_image(200, 120, 0), make_image(120, 200, 1)], "swap them")
    bridge = _open(create_default_bridge(cache.qwen3, cache.qwen25, mode="residual"))
    out = bridge(cache.qwen3, cache.qwen25)
    assert out.prompt_embeds.shape[1:] == cache.qwen25.prompt_embeds.shape


def test_save_load_round_trip_and_dimension_check(tmp_path, caches):
    sample = caches[0]
    bridge = _open(create_default_bridge(sample.qwen3, sample.qwen25, mode="residual"), 0.3)
    bridge.save_pretrained(tmp_path / "bridge")
    loaded = VisionCacheBridge.from_pretrained(tmp_path / "bridge", expect=BridgeConfig.from_caches(sample.qwen3, sample.qwen25))
    assert torch.equal(loaded(sample.qwen3, sample.qwen25).prompt_embeds, bridge(sample.qwen3, sample.qwen25).prompt_embeds)
    with pytest.raises(ValueError, match="qwen25_hidden_dim: checkpoint 64 vs models 3584"):
        VisionCacheBridge.from_pretrained(tmp_path / "bridge", expect=BridgeConfig())
    import json

    config = json.loads((tmp_path / "bridge" / "config.json").read_text())
    # a checkpoint of the bounded residual written before modes existed loads as "residual", unchanged
    legacy = {k: v for k, v in config.items() if k not in ("mode", "num_tokens")} | {"bridge_format": 2}
    (tmp_path / "bridge" / "config.json").write_text(json.dumps(legacy))
    old = VisionCacheBridge.from_pretrained(tmp_path / "bridge")
    assert old.config.mode == "residual" and old.tokens is None
    assert torch.equal(old(sample.qwen3, sample.qwen25).prompt_embeds, bridge(sample.qwen3, sample.qwen25).prompt_embeds)
    del config["bridge_format"]  # a checkpoint of the unbounded bridge
    (tmp_path / "bridge" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format 1 .* retrain"):
        VisionCacheBridge.from_pretrained(tmp_path / "bridge")


def test_mismatched_and_non_finite_caches_are_refused(caches, plus_extractor):
    sample = caches[0]
    bridge = create_default_bridge(sample.qwen3, sample.qwen25, mode="residual")
    with pytest.raises(ValueError, match="different numbers of condition images"):
        plus = plus_extractor.extract([make_image(), make_image(90, 90, 1)], "x")
        bridge(sample.qwen3, plus.qwen25)
    broken = caches[1].qwen25
    broken_embeds = broken.prompt_embeds.clone()
    broken_embeds[0, 0] = float("nan")
    from dataclasses import replace

    with pytest.raises(ValueError, match="NaN or Inf"):
        bridge(caches[1].qwen3, replace(broken, prompt_embeds=broken_embeds))
    wrong = VisionCacheBridge(BridgeConfig(qwen3_hidden_dim=96, qwen25_hidden_dim=64, rank=32))
    with pytest.raises(ValueError, match="Qwen3 hidden size 128 != bridge 96"):
        wrong(sample.qwen3, sample.qwen25)


@pytest.mark.parametrize("mode, low, high", [("residual", 4e6, 6e6), ("tokens", 3e6, 10e6), ("both", 5e6, 10e6)])
def test_parameter_count_at_real_dimensions(mode, low, high):
    with torch.device("meta"):
        bridge = VisionCacheBridge(BridgeConfig(mode=mode))
    assert low <= bridge.num_parameters() <= high


def test_caches_of_different_images_or_revisions_are_refused(caches):
    from dataclasses import replace

    first, second = caches[0], caches[1]
    bridge = create_default_bridge(first.qwen3, first.qwen25, mode="residual")
    with pytest.raises(ValueError, match="different images"):
        bridge(first.qwen3, replace(second.qwen25, grid_thw=first.qwen25.grid_thw))
    with pytest.raises(ValueError, match="Qwen2.5 revision 'other' != bridge's"):
        bridge(first.qwen3, replace(first.qwen25, revision="other"))


# -- the token path -------------------------------------------------------------------------------------------


def _tokens_bridge(cache, mode="tokens", num_tokens=3, **overrides):
    torch.manual_seed(0)
    bridge = create_default_bridge(cache.qwen3, cache.qwen25, mode=mode, num_tokens=num_tokens, rank=32, **overrides)
    return _open(bridge) if mode == "both" else bridge


@pytest.mark.parametrize("mode", ["residual", "tokens", "both"])
def test_no_bridge_is_the_baseline_whatever_the_design(caches, mode):
    from bridgecore.model.bridge import identity_bridge

    sample = caches[1]
    config = BridgeConfig.from_caches(sample.qwen3, sample.qwen25, mode=mode)
    out = identity_bridge(config)(sample.qwen3, sample.qwen25)
    assert torch.equal(out.prompt_embeds[0], sample.qwen25.prompt_embeds) and out.prompt_embeds_mask.all()


@pytest.mark.parametrize("mode", ["tokens", "both"])
def test_tokens_are_packed_right_after_each_sample_own_tokens(caches, mode):
    """Prompts of three lengths in one batch: each row is [own tokens ; K tokens ; padding], the mask covers exactly
    the first L_i + K positions, and every row equals the sample bridged alone (RoPE positions L_i .. L_i + K - 1
    in any batch, as in training)."""
    bridge = _tokens_bridge(caches[0], mode).eval()
    lengths = [c.qwen25.prompt_embeds.shape[0] for c in caches]
    assert len(set(lengths)) == 3
    batch = bridge([c.qwen3 for c in caches], [c.qwen25 for c in caches])
    assert batch.prompt_embeds.shape[1] == max(lengths) + 3
    for b, (cache, length) in enumerate(zip(caches, lengths)):
        single = bridge(cache.qwen3, cache.qwen25).prompt_embeds[0]
        assert single.shape[0] == length + 3
        torch.testing.assert_close(batch.prompt_embeds[b, : length + 3], single)
        assert batch.prompt_embeds_mask[b].tolist() == [1] * (length + 3) + [0] * (max(lengths) - length)
        if mode == "tokens":  # the sample's own tokens are untouched: the information arrives in the new ones
            assert torch.equal(single[:length], cache.qwen25.prompt_embeds)
        assert single[length:].abs().sum() > 0


def test_tokens_follow_what_qwen3_read_and_nothing_else(caches, extractor):
    """Only the Qwen3 cache changes (another instruction, the same image): the appended tokens change, the
    sample's own tokens do not. A Qwen2.5 cache of another instruction changes nothing in the tokens."""
    bridge = _tokens_bridge(caches[0]).eval()
    image = make_image(200, 120, 0)
    red, blue = extractor.extract([image, image], ["make the square red", "make the square blue"])
    with_red = bridge(red.qwen3, red.qwen25).prompt_embeds[0]
    with_blue = bridge(blue.qwen3, red.qwen25).prompt_embeds[0]  # Qwen2.5 read "red", Qwen3 read "blue"
    length = red.qwen25.prompt_embeds.shape[0]
    assert torch.equal(with_red[:length], with_blue[:length]) and not torch.allclose(with_red[length:], with_blue[length:])
    blue_25 = bridge(red.qwen3, blue.qwen25).prompt_embeds[0]
    torch.testing.assert_close(blue_25[length:], with_red[length:])


@pytest.mark.parametrize("mode", ["tokens", "both"])
def test_gradients_reach_every_token_parameter(caches, mode):
    sample = caches[0]
    bridge = _tokens_bridge(sample, mode, use_deepstack=True)
    bridge(sample.qwen3, sample.qwen25).prompt_embeds.pow(2).sum().backward()
    for name, parameter in bridge.named_parameters():
        if name == "fusion.score.bias":  # added to every level's score, so the softmax over levels cancels it:
            continue  # its gradient is 0 in exact arithmetic (float noise made it pass now and then)
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_token_bridge_round_trip_and_attention_maps(tmp_path, caches):
    sample = caches[2]
    bridge = _tokens_bridge(sample, "both").eval()
    bridge.save_pretrained(tmp_path / "bridge")
    loaded = VisionCacheBridge.from_pretrained(tmp_path / "bridge")
    assert loaded.config.mode == "both" and loaded.config.num_tokens == 3
    out = loaded(sample.qwen3, sample.qwen25, return_attention_weights=True)
    assert torch.equal(out.prompt_embeds, bridge(sample.qwen3, sample.qwen25).prompt_embeds)
    tokens_map = out.attention_weights[0]["tokens"]
    assert tokens_map.shape == (3, sample.qwen3.input_ids.numel())
    torch.testing.assert_close(tokens_map.sum(-1), torch.ones(3))
    stats = loaded.correction_statistics(sample.qwen3, sample.qwen25)
    assert stats["appended_tokens"] == 3 and stats["appended_rms_ratio"] > 0 and "gate_text" in stats


def test_modes_are_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        BridgeConfig(mode="append")
    with pytest.raises(ValueError, match="num_tokens must be at least 1"):
        BridgeConfig(mode="tokens", num_tokens=0)
    assert BridgeConfig(mode="residual", num_tokens=0).appended_tokens == 0


def test_the_token_streams_read_text_and_vision_apart(caches):
    """K=2 with token_streams: query 0 reads only Qwen3's text positions, query 1 only its vision positions, so a
    change at the vision positions moves token 1 alone and a change at the text positions token 0 alone."""
    sample = caches[0]
    bridge = _tokens_bridge(sample, num_tokens=2, token_streams=True).eval()
    qwen3, qwen25 = sample.qwen3, sample.qwen25
    length = qwen25.prompt_embeds.shape[0]
    vision = torch.zeros(qwen3.input_ids.shape[0], dtype=torch.bool)
    vision[qwen3.vision_positions] = True
    with torch.no_grad():
        out = bridge(qwen3, qwen25, return_attention_weights=True)
        attention = out.attention_weights[0]["tokens"]  # [K, L3]
        assert attention[0, vision].sum() == 0 and attention[1, ~vision].sum() == 0
        assert attention[0].sum() == pytest.approx(1) and attention[1].sum() == pytest.approx(1)
        for where, moved in ((vision, 1), (~vision, 0)):
            changed = replace(qwen3, levels={k: v + 3.0 * where.unsqueeze(-1) for k, v in qwen3.levels.items()})
            tokens = bridge(changed, qwen25).prompt_embeds[0, length:length + 2]
            before = out.prompt_embeds[0, length:length + 2]
            assert not torch.allclose(tokens[moved], before[moved]) and torch.equal(tokens[1 - moved], before[1 - moved])


def test_stream_query_init_starts_each_stream_as_one_reader_and_leaves_k2_unchanged(caches):
    """query_init="stream": with K=4 the two text queries start within a hundredth of each other (so do the two
    vision queries) while the streams stay apart, and the four appended tokens start as two pairs; at K=2 (one query
    per stream) the bridge is the same draw as "random"."""
    from bridgecore.model.bridge import query_streams

    sample = caches[0]
    assert query_streams(4) == ([0, 1], [2, 3]) and query_streams(3) == ([0, 1], [2]) and query_streams(1) == ([0], [])
    stream = _tokens_bridge(sample, num_tokens=4, token_streams=True, query_init="stream").eval()
    random = _tokens_bridge(sample, num_tokens=4, token_streams=True, query_init="random").eval()
    queries = stream.tokens.queries.detach()
    spread = queries.norm(dim=-1).mean()
    assert (queries[0] - queries[1]).norm() < 0.05 * spread and (queries[2] - queries[3]).norm() < 0.05 * spread
    assert (queries[0] - queries[2]).norm() > 0.5 * spread
    assert (random.tokens.queries[0] - random.tokens.queries[1]).norm() > 0.5 * spread
    length = sample.qwen25.prompt_embeds.shape[0]
    with torch.no_grad():
        tokens = stream(sample.qwen3, sample.qwen25).prompt_embeds[0, length:length + 4]
    scale = tokens.norm(dim=-1).mean()
    assert (tokens[0] - tokens[1]).norm() < 0.05 * scale and (tokens[0] - tokens[2]).norm() > 0.05 * scale
    two = [_tokens_bridge(sample, num_tokens=2, token_streams=True, query_init=how) for how in ("stream", "random")]
    assert all(torch.equal(a, b) for a, b in zip(two[0].state_dict().values(), two[1].state_dict().values()))
    with pytest.raises(ValueError, match="query_init"):
        BridgeConfig(query_init="tied")


def test_a_checkpoint_saved_before_the_streams_loads_with_one_query_over_everything(caches, tmp_path):
    import json

    bridge = _tokens_bridge(caches[0], num_tokens=2, token_streams=False)
    bridge.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["token_streams"]  # as written before the option existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = VisionCacheBridge.from_pretrained(tmp_path / "old")
    assert loaded.config.token_streams is False and BridgeConfig().token_streams is True
    with torch.no_grad():
        assert torch.equal(loaded(caches[0].qwen3, caches[0].qwen25).prompt_embeds,
                           bridge(caches[0].qwen3, caches[0].qwen25).prompt_embeds)
