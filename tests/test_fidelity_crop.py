"""The training crop reaches every position of the public R2Gen's ``Resize(256)`` + ``RandomCrop(224)``
(issue 15), on portrait, landscape and square radiographs, and square data keeps its draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from r2gen.config import ConfigError, DataConfig, Params
from r2gen.data.batches import StudyBatches, crop_view
from r2gen.data.images import load_prepared, prepare_dataset
from r2gen.errors import DataError
from r2gen.tokenizer import Tokenizer

torchvision = pytest.importorskip("torchvision")
transforms, TF = torchvision.transforms, torchvision.transforms.functional

# (width, height) of train views: portrait and landscape CXR-like ratios, a 1.5:1 view exactly at the
# default bound, a near-square one, and two beyond the bound (cut to it).
WITHIN = [(300, 364), (364, 300), (270, 380), (390, 260), (250, 251), (257, 300)]
BEYOND = [(200, 420), (430, 210)]


def write_dataset(root, train_views: list[tuple[int, int]], seed: int = 0):
    """An IU X-Ray-layout dataset whose train studies hold ``train_views`` (noise PNGs), two per study."""
    rng = np.random.default_rng(seed)
    views = list(train_views) + [(260, 300)] * (len(train_views) % 2)
    pairs = [views[i : i + 2] for i in range(0, len(views), 2)]
    ann = {"train": [], "val": [], "test": []}
    studies = [("train", pair) for pair in pairs] + [("val", [(240, 240)] * 2), ("test", [(240, 240)] * 2)]
    for n, (split, pair) in enumerate(studies):
        sid = f"CXR{n}"
        for v, (w, h) in enumerate(pair):
            path = root / "images" / sid / f"{v}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8)).save(path)
        ann[split].append({"id": sid, "report": "the heart is normal .", "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
                           "split": split})
    (root / "annotation.json").write_text(json.dumps(ann))
    return ann


def public_positions(width: int, height: int, resize: int = 256, crop: int = 224) -> set[tuple[int, int]]:
    """Every (top, left) that torchvision's RandomCrop(crop) can draw on Resize(resize)'s output."""
    new_h, new_w = TF._compute_resized_output_size((height, width), [resize])
    return {(y, x) for y in range(new_h - crop + 1) for x in range(new_w - crop + 1)}


@pytest.fixture(scope="module")
def prepared_224(tmp_path_factory):
    base = tmp_path_factory.mktemp("crop224")
    ann = write_dataset(base / "iu", WITHIN + BEYOND)
    cfg = DataConfig(root=str(base / "iu"), image_size=224)  # stored short side 256, as R2Gen
    summary = prepare_dataset(cfg, base / "prepared")
    return base, ann, summary, load_prepared(base / "prepared", "train")


def view_index(k: int) -> tuple[int, int]:
    """(study row, view) of the k-th train view written by write_dataset."""
    return k // 2, k % 2


def test_every_public_crop_position_is_reachable(prepared_224):
    _, _, summary, split = prepared_224
    assert summary["sizes"]["train"] == 256 and summary["train_views_clipped"] == len(BEYOND)
    for k, (w, h) in enumerate(WITHIN):
        row, v = view_index(k)
        ours_h, ours_w = split.sizes[row, v]
        ours = {(y, x) for y in range(ours_h - 224 + 1) for x in range(ours_w - 224 + 1)}
        assert ours == public_positions(w, h), (w, h)
        assert len(ours) > 33 * 33  # the central 256 x 256 square gave 33 x 33


def test_crops_equal_torchvisions_resize_then_crop_at_the_same_offsets(prepared_224):
    base, ann, _, split = prepared_224
    for k, (w, h) in enumerate(WITHIN):
        row, v = view_index(k)
        source = Image.open(base / "iu" / "images" / ann["train"][row]["image_path"][v]).convert("RGB")
        public = transforms.Resize(256)(source)  # R2Gen's train transform, before RandomCrop
        H, W = public.height, public.width
        stored = torch.from_numpy(np.array(split.images[row, v]))
        for y, x in {(0, 0), (H - 224, W - 224), (0, W - 224), (H - 224, 0), ((H - 224) // 2, (W - 224) // 3)}:
            expected = np.asarray(TF.crop(public, y, x, 224, 224))[..., 0]  # R = G = B for a grayscale source
            ours = crop_view(stored, tuple(split.sizes[row, v]), y, x, 224).numpy()
            # Equal here; "within 1" leaves room for PIL resampling RGB and L images through different paths.
            assert np.abs(ours.astype(int) - expected).max() <= 1, ((w, h), (y, x))


def test_views_beyond_the_aspect_bound_keep_their_central_part(prepared_224):
    base, ann, summary, split = prepared_224
    bound = int(256 * 1.5)
    assert summary["shapes"]["train"] == [bound, 256]
    for k, (w, h) in enumerate(BEYOND, start=len(WITHIN)):
        row, v = view_index(k)
        source = Image.open(base / "iu" / "images" / ann["train"][row]["image_path"][v]).convert("L")
        resized = transforms.Resize(256)(source)
        kept = transforms.CenterCrop((min(resized.height, bound), min(resized.width, bound)))(resized)
        assert tuple(split.sizes[row, v]) == (kept.height, kept.width)
        # The kept positions are the public ones around the centre: same pixels at the shifted offset.
        # torchvision's CenterCrop offset (F.center_crop): int(round((size - crop) / 2.0)), half to even
        shift = int(round((max(resized.size) - bound) / 2.0))
        assert shift in ((max(resized.size) - bound) // 2, (max(resized.size) - bound + 1) // 2)
        y, x = (5, 7)
        public = np.asarray(TF.crop(resized, y + shift, x, 224, 224) if h > w else TF.crop(resized, y, x + shift, 224, 224))
        ours = crop_view(torch.from_numpy(np.array(split.images[row, v])), tuple(split.sizes[row, v]),
                         y, x, 224).numpy()
        np.testing.assert_array_equal(ours, public)


def test_offsets_are_drawn_over_each_views_full_range(prepared_224):
    _, _, _, split = prepared_224
    tokenizer = Tokenizer.build(split.reports, "iu_xray", threshold=1, max_seq_length=60)
    batches = StudyBatches(split, tokenizer, 16, 224, train=True, generator=torch.Generator().manual_seed(0))
    assert batches.square is None
    idx = torch.arange(len(split.ids))
    draws = torch.stack([batches._draw_augmentation(idx)["offsets"] for _ in range(3000)])  # (n, B, V, 2)
    ranges = torch.from_numpy(split.sizes).long() - 224 + 1  # (B, V, 2)
    assert (draws.amin(0) == 0).all() and (draws.amax(0) == ranges - 1).all()
    # Roughly uniform: the mean offset is half the range (within 5 standard errors).
    mean, half = draws.double().mean(0), (ranges.double() - 1) / 2
    assert ((mean - half).abs() <= 5 * ranges.double() / (12 * len(draws)) ** 0.5 + 1e-9).all()
    images, _ = next(iter(batches))
    assert images.shape[-2:] == (224, 224)


def test_square_views_keep_todays_single_randint_draw(tmp_path):
    """The bundled sample is square: its crops are the ones the central-square cache gave, draw for draw."""
    write_dataset(tmp_path / "iu", [(200, 200)] * 4)
    prepare_dataset(DataConfig(root=str(tmp_path / "iu"), image_size=64), tmp_path / "prepared")
    split = load_prepared(tmp_path / "prepared", "train")
    assert split.images.shape == (2, 2, 73, 73) and (split.sizes == 73).all()
    tokenizer = Tokenizer.build(split.reports, "iu_xray", threshold=1, max_seq_length=60)
    batches = list(StudyBatches(split, tokenizer, 2, 64, train=True, hflip=True,
                                generator=torch.Generator().manual_seed(4)))
    gen = torch.Generator().manual_seed(4)
    order = torch.randperm(2, generator=gen)
    offsets = torch.randint(0, 73 - 64 + 1, (2, 2, 2), generator=gen)
    flips = torch.rand(2, 2, generator=gen) < 0.5
    expected = torch.stack([torch.stack([
        torch.from_numpy(np.ascontiguousarray(split.images[i, v, y : y + 64, x : x + 64]))
        for v, (y, x) in enumerate(offsets[b].tolist())]) for b, i in enumerate(order.tolist())])
    expected = torch.where(flips[:, :, None, None], expected.flip(-1), expected)
    assert len(batches) == 1 and torch.equal(batches[0][0], expected)


def test_max_aspect_one_is_the_central_square(tmp_path):
    write_dataset(tmp_path / "iu", [(300, 364), (364, 300)])
    prepare_dataset(DataConfig(root=str(tmp_path / "iu"), image_size=64, train_max_aspect=1.0), tmp_path / "p")
    split = load_prepared(tmp_path / "p", "train")
    assert split.images.shape == (1, 2, 73, 73) and (split.sizes == 73).all()
    for v in range(2):
        source = Image.open(tmp_path / "iu" / "images" / "CXR0" / f"{v}.png").convert("L")
        expected = np.asarray(transforms.CenterCrop(73)(transforms.Resize(73)(source)))
        np.testing.assert_array_equal(split.images[0, v], expected)


@pytest.mark.parametrize("value, message", [(0.9, "data.train_max_aspect must be from 1 to 10"),
                                            (float("nan"), "data.train_max_aspect must be a finite number"),
                                            (12, "data.train_max_aspect must be from 1 to 10"),
                                            ("wide", "must be a number")])
def test_train_max_aspect_is_checked(value, message):
    with pytest.raises(ConfigError, match=message):
        Params.from_dict({"data": {"train_max_aspect": value}})


def test_a_cache_without_view_sizes_is_refused(tmp_path):
    write_dataset(tmp_path / "iu", [(300, 364), (364, 300)])
    out = tmp_path / "p"
    prepare_dataset(DataConfig(root=str(tmp_path / "iu"), image_size=64), out)
    np.save(out / "train.sizes.npy", np.full((1, 2, 2), 500, dtype=np.int32))
    with pytest.raises(DataError, match="view sizes that do not fit"):
        load_prepared(out, "train")
    (out / "train.sizes.npy").unlink()
    with pytest.raises(DataError, match="train.sizes.npy is missing; run `dvc repro prepare`"):
        load_prepared(out, "train")
