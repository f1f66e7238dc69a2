"""The R2Gen model: fidelity to the public code, gradients, numerics, and the beam search."""

from __future__ import annotations

import pytest
import torch

from r2gen.config import ModelConfig
from r2gen.decoding import beam_search
from r2gen.model.r2gen import FullRecomputeStepper, IncrementalStepper, R2Gen

torch.set_num_threads(1)

TINY = ModelConfig(visual_extractor="resnet10", visual_width=8, d_model=32, d_ff=32, num_heads=4,
                   num_layers=2, rm_num_slots=3, rm_num_heads=4, rm_d_model=32)


def tiny_batch(seed=0, B=4, V=2, size=32, vocab=12, T=9):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, V, size, size), dtype=torch.uint8, generator=g)
    labels = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 3 + b  # different lengths, 0-padded after the EOS
        labels[b, 1 : 1 + n] = torch.randint(1, vocab, (n,), generator=g)
    return images, labels


def test_paper_profile_has_the_public_codes_parameter_count():
    # resnet101 trunk (torchvision resnet101 44,549,160 minus fc 2048*1000+1000)   42,500,160
    # att_embed Linear(2048, 512)                                                    1,049,088
    # encoder: 3 x (attention 4*(512*512+512) + FFN 2*(512*512+512) + 2 LN*1024)
    #          + final LN 1024 = 3*1,577,984 + 1,024                                 4,734,976
    # relational memory: attention 1,050,624 + MLP 525,312 + W,U 2*(512*1024+1024)   2,626,560
    # decoder: 3 x (2 attention 2,101,248 + FFN 525,312
    #          + 3 MCLN x (1024 + 2*((1536*512+512) + (512*512+512)))) + final LN 1024  26,782,720
    # vocabulary-dependent: embedding V*512 + logit V*512 + V = 1025 V
    # With 760 tokens (V = 761 classes incl. id 0): 77,693,504 + 1025*761 = 78,473,529, the count of
    # cuhksz-nlp/R2Gen's R2GenModel built with the same arguments (checked by running it).
    cfg = ModelConfig()  # the paper profile is the default ModelConfig
    with torch.device("meta"):
        model = R2Gen(cfg, vocab_size=761)
    assert sum(p.numel() for p in model.parameters()) == 77_693_504 + 1025 * 761 == 78_473_529


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = R2Gen(TINY, vocab_size=12)
    images, labels = tiny_batch()
    model(images, labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_first_step_losses_are_golden():
    """Changed only on purpose: any change to init, masking or the loss moves these numbers."""
    torch.manual_seed(1234)
    model = R2Gen(TINY, vocab_size=12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = tiny_batch()
    losses = []
    for _ in range(3):
        loss = model(images, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=2e-4)


GOLDEN_LOSSES = [2.5825, 2.5671, 2.5650]


def test_loss_masks_padding_and_keeps_one_eos():
    labels = torch.tensor([[0, 5, 6, 0, 0], [0, 1, 2, 3, 4]])  # 2nd: truncated, no EOS
    mask = R2Gen.target_mask(labels)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_padding_does_not_change_the_loss_of_a_study():
    torch.manual_seed(0)
    model = R2Gen(TINY, vocab_size=12).eval()
    images, labels = tiny_batch(B=1)
    longer = torch.cat([labels, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    assert model(images, labels).loss.item() == pytest.approx(model(images, longer).loss.item(), abs=1e-6)


def test_fp16_forward_and_backward_have_no_inf_or_nan():
    torch.manual_seed(0)
    model = R2Gen(TINY, vocab_size=12)
    images, labels = tiny_batch()
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(images, labels)
    assert out.logprobs.dtype == torch.float32  # log_softmax and the loss stay fp32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.logprobs).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_same_seed_gives_identical_losses():
    def run():
        torch.manual_seed(7)
        model = R2Gen(TINY, vocab_size=12)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        images, labels = tiny_batch()
        out = []
        for _ in range(3):
            loss = model(images, labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    assert run() == run()


def test_fp8_candidates_are_the_attention_and_feed_forward_linears():
    model = R2Gen(TINY, vocab_size=12)
    names = [n for n, _ in model.fp8_candidates()]
    # per encoder layer: 4 attention + 2 FFN; per decoder layer: 8 attention + 2 FFN
    assert len(names) == 2 * 6 + 2 * 10
    assert not any(n.startswith(("rm.", "att_embed", "logit")) or "mlp_" in n for n in names)
    assert "decoder_layers.1.src_attn.k_proj" in names and "encoder.layers.0.feed_forward.w_2" in names


def overfit(steps=150):
    torch.manual_seed(0)
    model = R2Gen(TINY, vocab_size=12)
    images, labels = tiny_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(images, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), images, labels, loss.item()


@pytest.fixture(scope="module")
def overfit_model():
    return overfit()


def test_visual_recompute_is_validated_and_reaches_the_extractor():
    from r2gen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.visual_recompute must be 0 \(off\) to 5 .*got 6"):
        ModelConfig(visual_recompute=6)
    cfg = ModelConfig(**{**TINY.__dict__, "visual_recompute": 3})
    assert R2Gen(cfg, vocab_size=12).visual.recompute == 3


@pytest.mark.parametrize("name", ["resnet10", "resnet50"])  # BasicBlock and Bottleneck, with downsampling
def test_eval_folds_batch_norm_into_the_convolutions_without_changing_the_features(name):
    from r2gen.model.visual import VisualExtractor

    torch.manual_seed(0)
    visual = VisualExtractor(name, width=8)
    images = torch.randint(0, 256, (4, 2, 32, 32), dtype=torch.uint8)
    for _ in range(3):  # running statistics away from their initial 0/1
        visual(images)
    for m in visual.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    visual.eval()
    with torch.no_grad():
        folded, pooled = visual(images)
        maps = visual.trunk(visual._normalize(images.flatten(0, 1)))  # the modules' own eval forward
    expected = maps.flatten(2).transpose(1, 2).reshape(folded.shape)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(pooled, maps.mean((2, 3)).reshape(pooled.shape), rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_tiny_model_overfits_four_studies(overfit_model):
    model, images, labels, final_loss = overfit_model
    assert final_loss < 0.1
    generated = model.generate(images, num_beams=3, max_new_tokens=12)
    for b in range(len(labels)):
        n = int((labels[b, 1:] > 0).sum())
        assert generated[b, : n + 1].tolist() == labels[b, 1 : n + 2].tolist()  # words, then EOS


@pytest.mark.parametrize("num_beams", [1, 2, 3, 5])
def test_beam_search_matches_full_recompute(overfit_model, num_beams):
    model, images, _, _ = overfit_model
    torch.manual_seed(num_beams)
    with torch.no_grad():  # the trained model plus a perturbed copy, so beams diverge and finish at different steps
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        src = model.encode(images)
        fast = beam_search(IncrementalStepper(model, src, 20), len(images), num_beams, 20)
        ref = beam_search(FullRecomputeStepper(model, src), len(images), num_beams, 20, early_exit=False)
    assert fast.tolist() == ref.tolist()
    assert (fast == 0).any(), "the search should end some reports before max length"


def test_beam_search_matches_full_recompute_on_random_models():
    for seed in range(4):
        torch.manual_seed(seed)
        model = R2Gen(TINY, vocab_size=6).eval()
        with torch.no_grad():
            model.logit.bias[0] += 1.5  # make EOS likely so beams finish at different steps
            images, _ = tiny_batch(seed, B=5)
            src = model.encode(images)
            fast = beam_search(IncrementalStepper(model, src, 15), 5, 3, 15)
            ref = beam_search(FullRecomputeStepper(model, src), 5, 3, 15, early_exit=False)
        assert fast.tolist() == ref.tolist()


def test_mimic_layout_single_view_works():
    torch.manual_seed(0)
    model = R2Gen(TINY, vocab_size=12)
    images, labels = tiny_batch(V=1)
    assert torch.isfinite(model(images, labels).loss)
    assert model.eval().generate(images, num_beams=2, max_new_tokens=5).shape[0] == 4
