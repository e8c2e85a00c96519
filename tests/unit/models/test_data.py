"""The folders dataset format, class order and mapping, resizing, augmentation and splits."""

from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from models.data import (
    FORMATS,
    Augment,
    ImageDataset,
    load_samples,
    register_format,
    split_samples,
    stratified_split,
)
from models.errors import DataError
from models.images import read_image, read_mask, to_input_size
from models.samples import Sample, SampleSet, order_classes, remap_classes
from tests.helpers.datasets import make_folders_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_folders_format_lists_images_labels_and_masks(tmp_path):
    """Each class folder's images get that class's label; a `_mask.png` beside an image is its mask."""
    root = make_folders_dataset(tmp_path / "d", n_per_class=3, size=16)
    data = load_samples(root, "folders")
    assert data.classes == ("good", "dirt", "scratch", "ec")
    assert len(data) == 12
    assert data.counts() == {"good": 3, "dirt": 3, "scratch": 3, "ec": 3}
    for s in data.samples:
        assert not s.path.name.endswith("_mask.png")
        assert data.classes[s.label] == s.path.parent.name
        has_mask = data.classes[s.label] in ("dirt", "scratch")
        assert (s.mask is not None) == has_mask
        if has_mask:
            assert s.mask == s.path.with_name(s.path.stem + "_mask.png")


def test_class_order_keeps_default_classes_first_then_sorted(tmp_path):
    """Known names keep DEFAULT_CLASSES order; unknown names follow, sorted."""
    assert order_classes(["zeta", "ec", "alpha", "good", "dirt"]) == ("good", "dirt", "ec", "alpha", "zeta")
    make_folders_dataset(tmp_path / "d", classes=("scratch", "mt_crack", "good"), n_per_class=1, size=16)
    assert load_samples(tmp_path / "d").classes == ("good", "scratch", "mt_crack")


def test_all_image_suffixes_are_read_and_other_files_ignored(tmp_path):
    """png/jpg/jpeg/bmp/tif images count (any case); text files, hidden files and root files do not."""
    d = tmp_path / "d" / "good"
    d.mkdir(parents=True)
    img = np.full((8, 8), 100, np.uint8)
    for name in ("a.png", "b.JPG", "c.jpeg", "d.bmp", "e.tif"):
        cv2.imwrite(str(d / name.lower()), img)
        (d / name.lower()).rename(d / name)
    (d / "notes.txt").write_text("x")
    cv2.imwrite(str(d / ".hidden.png"), img)
    cv2.imwrite(str(tmp_path / "d" / "stray.png"), img)
    data = load_samples(tmp_path / "d")
    assert sorted(s.path.name for s in data.samples) == ["a.png", "b.JPG", "c.jpeg", "d.bmp", "e.tif"]
    assert all(read_image(s.path).shape == (8, 8) for s in data.samples)


def test_group_is_the_stem_prefix_before_double_underscore(tmp_path):
    """`frame7__s3.png` belongs to group `frame7`; a plain name is its own group."""
    for cls, name in (("good", "frame7__s0.png"), ("dirt", "frame7__s1.png"), ("good", "single.png")):
        (tmp_path / cls).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / cls / name), np.zeros((8, 8), np.uint8))
    groups = {s.path.name: s.group for s in load_samples(tmp_path).samples}
    assert groups == {"frame7__s0.png": "frame7", "frame7__s1.png": "frame7", "single.png": "good/single"}


def test_missing_folder_is_a_clear_error(tmp_path):
    """A data path that does not exist names the path and the option."""
    with pytest.raises(DataError, match=r"does not exist: check --data"):
        load_samples(tmp_path / "nope")


def test_folder_without_class_subfolders_is_a_clear_error(tmp_path):
    """A root with no class subfolders explains the expected layout."""
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="no class subfolders"):
        load_samples(tmp_path)


def test_empty_class_folder_is_a_clear_error(tmp_path):
    """A class folder without images (masks alone do not count) is named in the error."""
    make_folders_dataset(tmp_path, classes=("good",), n_per_class=2, size=8)
    (tmp_path / "dirt").mkdir()
    cv2.imwrite(str(tmp_path / "dirt" / "x_mask.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"class folder .*dirt holds no images"):
        load_samples(tmp_path)


def test_unreadable_image_error_names_the_file(tmp_path):
    """A corrupt image file raises DataError naming that file."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad)
    with pytest.raises(DataError, match="broken.png"):
        ImageDataset([Sample(path=bad, label=0)], size=8)


def test_unknown_format_lists_the_known_ones(tmp_path):
    """An unknown --format names the registered formats."""
    with pytest.raises(DataError, match="folders"):
        load_samples(tmp_path, "nope")


def test_register_format_plugs_a_loader_into_load_samples(tmp_path):
    """A loader registered under a name is what load_samples(root, name) uses."""
    @register_format("test-dummy")
    def _load(root):
        return SampleSet(root=root, format="test-dummy", classes=("good", "dirt"), samples=())

    try:
        assert load_samples(tmp_path, "test-dummy").format == "test-dummy"
    finally:
        FORMATS.pop("test-dummy")


def test_remap_classes_by_name_and_unknown_class_error(tmp_path):
    """Data labels are re-indexed onto the model's classes by name; an unknown class is an error."""
    make_folders_dataset(tmp_path / "a", classes=("dirt", "ec"), n_per_class=2, size=8)
    data = remap_classes(load_samples(tmp_path / "a"), ("good", "dirt", "scratch", "ec"))
    assert sorted({(s.path.parent.name, s.label) for s in data.samples}) == [("dirt", 1), ("ec", 3)]
    make_folders_dataset(tmp_path / "b", classes=("good", "rust"), n_per_class=1, size=8)
    with pytest.raises(DataError, match="'rust' that the model does not know"):
        remap_classes(load_samples(tmp_path / "b"), ("good", "dirt"))


def test_resize_policy_letterbox_for_images_nearest_for_masks(tmp_path):
    """Non-square images are letterboxed to S x S (aspect kept, zero padding); square ones resized; masks binary."""
    img = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))  # 32 x 64, non-square
    out = to_input_size(img, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    inner = cv2.resize(img, (16, 8), interpolation=cv2.INTER_AREA)  # long side 16, aspect 2:1 kept
    np.testing.assert_array_equal(out[4:12], inner)
    assert not out[:4].any() and not out[12:].any()  # zero padding above and below
    sq = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    np.testing.assert_array_equal(to_input_size(sq, 16), cv2.resize(sq, (16, 16), interpolation=cv2.INTER_AREA))
    assert to_input_size(out, 16) is out
    m = np.zeros((30, 30), np.uint8)
    m[5:20, 5:20] = 255
    cv2.imwrite(str(tmp_path / "m.png"), m)
    mask = read_mask(tmp_path / "m.png", 16)
    assert mask.dtype == bool and mask.shape == (16, 16) and 0 < mask.sum() < 256


def test_dataset_returns_uint8_tensor_and_label(tmp_path):
    """Items are (uint8 tensor (1, S, S), int label), images resized to S."""
    root = make_folders_dataset(tmp_path, n_per_class=2, size=24)
    data = load_samples(root)
    ds = ImageDataset(data.samples, size=16)
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (1, 16, 16)
    assert y == data.samples[3].label


def test_augmentation_is_seeded_per_epoch_and_index(tmp_path):
    """The same (seed, epoch, index) gives the same augmented image; another epoch a different one."""
    root = make_folders_dataset(tmp_path, classes=("dirt",), n_per_class=3, size=24)
    samples = load_samples(root).samples
    a = ImageDataset(samples, 24, Augment(), seed=3, preload=False)
    b = ImageDataset(samples, 24, Augment(), seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(3))
    first = [a[i][0] for i in range(3)]
    a.set_epoch(2)
    assert not all(torch.equal(a[i][0], first[i]) for i in range(3))


def test_augment_flips_and_jitter_stay_in_range():
    """Flips permute pixels; the brightness/contrast jitter stays within 0..255 and is small."""
    img = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint8)
    flips = Augment(brightness=0.0, contrast=0.0)
    seen = {flips(img, np.random.default_rng(s)).tobytes() for s in range(40)}
    assert seen == {v.tobytes() for v in (img, img[:, ::-1], img[::-1], img[::-1, ::-1])}
    out = Augment(hflip=False, vflip=False)(img, np.random.default_rng(1))
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 25


def test_stratified_split_is_seeded_and_keeps_class_shares():
    """Each class loses about `fraction` of its samples (at least one), reproducibly for a seed."""
    labels = [0] * 20 + [1] * 10 + [2] * 3 + [3] * 1
    keep, held = stratified_split(labels, 0.2, seed=7)
    assert sorted(keep + held) == list(range(len(labels)))
    c = Counter(labels[i] for i in held)
    assert c == {0: 4, 1: 2, 2: 1}  # class 3 has one sample: it stays on the kept side
    assert (keep, held) == stratified_split(labels, 0.2, seed=7)
    assert held != stratified_split(labels, 0.2, seed=8)[1]
    assert stratified_split(labels, 0.0, seed=7)[1] == []


def test_grouped_split_keeps_groups_on_one_side():
    """Samples that share a group are never split between the two sides."""
    labels = [i % 2 for i in range(40)]
    groups = [f"frame{i // 4}" for i in range(40)]
    keep, held = stratified_split(labels, 0.25, seed=1, groups=groups)
    assert held
    kept_groups = {groups[i] for i in keep}
    assert not kept_groups & {groups[i] for i in held}


def test_split_samples_train_test_by_ratio(tmp_path):
    """split_samples returns (kept, held-out) sample lists covering the data once."""
    data = load_samples(make_folders_dataset(tmp_path, n_per_class=10, size=8))
    train, test = split_samples(data, 0.3, seed=0)
    assert len(train) + len(test) == 40
    assert data.counts(test) == {"good": 3, "dirt": 3, "scratch": 3, "ec": 3}


def test_rot90_adds_the_transposes_so_all_eight_symmetries_and_only_when_asked():
    """With rot90 the flips and a transpose give the 8 symmetries of the square, every 90-degree rotation among
    them; without it the draws are those of the flips alone (a run without the option is unchanged)."""
    img = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint8)
    dihedral = Augment(brightness=0.0, contrast=0.0, rot90=True)
    seen = {dihedral(img, np.random.default_rng(s)).tobytes() for s in range(200)}
    rotations = {np.rot90(img, k).tobytes() for k in range(4)}
    assert len(seen) == 8 and rotations <= seen
    plain, jitter = Augment(), Augment(rot90=False)
    assert all(np.array_equal(plain(img, np.random.default_rng(s)), jitter(img, np.random.default_rng(s)))
               for s in range(20))
    assert Augment(rot90=True).to_dict()["rot90"] is True
