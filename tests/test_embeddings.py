"""embed_images against model.encode_image on directly preprocessed images, with a
tiny random open_clip ViT registered for the tests; local checkpoints; the .npy
embeddings format; clear errors for bad folders, images and files."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")  # the `clip` extra; pinned in requirements.txt

from monoloss_kernels.embeddings import (  # noqa: E402
    ModelLoadError,
    embed_images,
    labels_path,
    list_images,
    load_clip_model,
    load_embeddings,
    save_embeddings,
)

# Tolerances. The same fp32 ops on the same images, batched differently: BLAS may sum
# in another order, so allow float32 rounding of O(1) values.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16 autocast keeps 8 mantissa bits through 2 transformer blocks: measured row cosine
# to fp32 ≥ 0.99995 on these images; we require ≥ 0.995.
BF16_MIN_COSINE = 0.995

TINY_MODEL = "monoloss-test-tiny-vit"
# A 2-layer, width-64 ViT and text tower (open_clip ships no model this small; ECOSYSTEM.md §4).
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    config = tmp_path_factory.mktemp("open_clip_config") / f"{TINY_MODEL}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        model, preprocess = load_clip_model(TINY_MODEL, pretrained=None)
    return model, preprocess


def write_images(folder, names, gen: np.random.Generator):
    """Random RGB PNGs of odd sizes; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names):
        height, width = 29 + 7 * index % 17, 41 - 5 * index % 13
        pixels = gen.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = folder / name
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def direct_embeddings(model, preprocess, paths):
    """model.encode_image on the preprocessed images, computed without embed_images."""
    pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        return model.encode_image(pixels).float()


@pytest.fixture
def flat_folder(tmp_path):
    # Created out of order; embed_images takes sorted names.
    names = ["b.png", "a_10.png", "a_2.png", "c.png", "a_1.png", "d.png", "e.png"]
    write_images(tmp_path / "flat", names, np.random.default_rng(1))
    return tmp_path / "flat"


@pytest.fixture
def class_folder(tmp_path):
    gen = np.random.default_rng(2)
    for name, count in (("eel", 2), ("cat", 3), ("dog", 2)):
        write_images(tmp_path / "classes" / name, [f"{name}{i}.png" for i in range(count)], gen)
    return tmp_path / "classes"


def test_flat_folder_equals_encode_image(tiny_clip, flat_folder):
    model, preprocess = tiny_clip
    got = embed_images(flat_folder, model=model, preprocess=preprocess, batch_size=3, progress=False)
    paths = sorted(flat_folder.glob("*.png"))
    assert list_images(flat_folder).paths == paths and list_images(flat_folder).labels is None
    assert got.labels is None
    assert got.embeddings.dtype == torch.float32 and got.embeddings.shape == (7, TINY_CONFIG["embed_dim"])
    torch.testing.assert_close(got.embeddings, direct_embeddings(model, preprocess, paths), **FP32_TOL)


class DropoutEncoder(torch.nn.Module):
    """An image encoder with dropout: random in train mode, the identity in eval mode."""

    def __init__(self, model):
        super().__init__()
        self.model, self.dropout = model, torch.nn.Dropout(0.5)

    def encode_image(self, pixels):
        return self.dropout(self.model.encode_image(pixels))


def test_model_in_train_mode_embeds_in_eval_mode(tiny_clip, flat_folder):
    """A model passed in train mode (as open_clip.create_model_and_transforms returns it)
    embeds in eval mode, deterministically, and is handed back in train mode."""
    model, preprocess = tiny_clip
    encoder = DropoutEncoder(model).train()
    try:
        got = embed_images(flat_folder, model=encoder, preprocess=preprocess, batch_size=3, progress=False)
        assert encoder.training and model.training
    finally:
        encoder.eval()
    expected = direct_embeddings(model, preprocess, sorted(flat_folder.glob("*.png")))
    torch.testing.assert_close(got.embeddings, expected, **FP32_TOL)


def test_class_folder_gives_labels(tiny_clip, class_folder):
    model, preprocess = tiny_clip
    emb, labels = embed_images(class_folder, model=model, preprocess=preprocess, batch_size=4, progress=False)
    listing = list_images(class_folder)
    assert listing.classes == ["cat", "dog", "eel"]
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 0, 1, 1, 2, 2] == listing.labels
    assert [path.parent.name for path in listing.paths] == ["cat"] * 3 + ["dog"] * 2 + ["eel"] * 2
    torch.testing.assert_close(emb, direct_embeddings(model, preprocess, listing.paths), **FP32_TOL)


def test_hidden_folders_are_not_classes(class_folder):
    """A hidden folder next to the class folders (Jupyter's .ipynb_checkpoints, even with an
    image in it) is no class: the labels stay those of the visible classes."""
    visible = list_images(class_folder)
    write_images(class_folder / ".ipynb_checkpoints", ["cat0-checkpoint.png"], np.random.default_rng(3))
    (class_folder / ".empty_hidden").mkdir()
    listing = list_images(class_folder)
    assert listing.classes == ["cat", "dog", "eel"] == visible.classes
    assert listing.labels == visible.labels and listing.paths == visible.paths
    (class_folder / "fox").mkdir()  # a visible class without images is refused, by name
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes fox"):
        list_images(class_folder)


def test_hidden_entries_inside_class_folders_are_not_samples(class_folder):
    """Hidden files and folders inside a class folder (a macOS `._` resource fork, Jupyter's
    checkpoints) are no samples; a class folder holding only hidden images has no images."""
    visible = list_images(class_folder)
    (class_folder / "cat" / "._cat0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    write_images(class_folder / "dog" / ".ipynb_checkpoints", ["dog0-checkpoint.png"], np.random.default_rng(4))
    write_images(class_folder / "eel" / "deeper", ["eel9.png"], np.random.default_rng(5))  # visible: a sample
    listing = list_images(class_folder)
    assert listing.paths == visible.paths + [class_folder / "eel" / "deeper" / "eel9.png"]
    assert listing.labels == visible.labels + [2]
    write_images(class_folder / "fox" / ".hidden", ["fox0.png"], np.random.default_rng(6))
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes fox"):
        list_images(class_folder)


def test_batch_size_does_not_matter(tiny_clip, flat_folder):
    model, preprocess = tiny_clip
    one = embed_images(flat_folder, model=model, preprocess=preprocess, batch_size=1, progress=False).embeddings
    for batch_size in (3, 64):
        other = embed_images(flat_folder, model=model, preprocess=preprocess, batch_size=batch_size,
                             progress=False).embeddings
        torch.testing.assert_close(other, one, **FP32_TOL)


def test_bf16_autocast_close_to_fp32(tiny_clip, flat_folder):
    model, preprocess = tiny_clip
    fp32 = embed_images(flat_folder, model=model, preprocess=preprocess, progress=False).embeddings
    bf16 = embed_images(flat_folder, model=model, preprocess=preprocess, precision="bf16", progress=False).embeddings
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # autocast did run in bf16
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    assert (cosine >= BF16_MIN_COSINE).all(), cosine


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_dataset_of_images_and_pairs(tiny_clip, flat_folder):
    model, preprocess = tiny_clip
    paths = sorted(flat_folder.glob("*.png"))
    images = [Image.open(path).convert("RGB") for path in paths]
    want = direct_embeddings(model, preprocess, paths)
    plain = embed_images(ListDataset(images), model=model, preprocess=preprocess, batch_size=2, progress=False)
    assert plain.labels is None
    torch.testing.assert_close(plain.embeddings, want, **FP32_TOL)
    pairs = ListDataset([(image, np.int64(i % 3)) for i, image in enumerate(images)])
    labelled = embed_images(pairs, model=model, preprocess=preprocess, batch_size=5, progress=False)
    assert labelled.labels.tolist() == [i % 3 for i in range(7)]
    torch.testing.assert_close(labelled.embeddings, want, **FP32_TOL)
    # Already preprocessed tensors go through unchanged.
    tensors = ListDataset([preprocess(image) for image in images])
    torch.testing.assert_close(embed_images(tensors, model=model, preprocess=preprocess, progress=False).embeddings,
                               want, **FP32_TOL)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_checkpoint_file(tiny_clip, flat_folder, tmp_path, suffix):
    model, preprocess = tiny_clip
    checkpoint = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({name: t.contiguous() for name, t in model.state_dict().items()}, checkpoint)
    else:
        torch.save(model.state_dict(), checkpoint)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random weights" warning with a checkpoint
        loaded, loaded_preprocess = load_clip_model(TINY_MODEL, checkpoint)
    assert not loaded.training
    want = embed_images(flat_folder, model=model, preprocess=preprocess, progress=False).embeddings
    got = embed_images(flat_folder, model_name=TINY_MODEL, pretrained=str(checkpoint), progress=False).embeddings
    assert torch.equal(got, want)
    assert torch.equal(embed_images(flat_folder, model=loaded, preprocess=loaded_preprocess,
                                    progress=False).embeddings, want)


def test_bad_checkpoints(tiny_clip, tmp_path):
    model, _ = tiny_clip
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=f"pretrained checkpoint {missing} does not exist"):
        load_clip_model(TINY_MODEL, missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=f"{garbage} could not be loaded into open_clip model"):
        load_clip_model(TINY_MODEL, garbage)
    truncated = tmp_path / "truncated.safetensors"
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{truncated} could not be loaded"):
        load_clip_model(TINY_MODEL, truncated)
    partial = tmp_path / "partial.pt"
    torch.save({name: t for name, t in model.state_dict().items() if not name.startswith("visual.")}, partial)
    with pytest.raises(ValueError, match=f"(?s){partial} could not be loaded into .*Missing key.*visual"):
        load_clip_model(TINY_MODEL, partial)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"pretrained checkpoint {empty} is empty"):
        load_clip_model(TINY_MODEL, empty)
    with pytest.raises(IsADirectoryError, match="local-dir:"):
        load_clip_model(TINY_MODEL, tmp_path)


def test_tag_failure_says_how_to_work_offline(tiny_clip):
    # A tag open_clip cannot resolve fails the way a download does offline: the error says what to do instead.
    with pytest.raises(ModelLoadError, match=r"pretrained='no-such-tag'.*local-dir:.*HF_HUB_OFFLINE=1"):
        load_clip_model(TINY_MODEL, "no-such-tag")
    with pytest.raises(ModelLoadError, match="could not create open_clip model 'NoSuchModel'"):
        load_clip_model("NoSuchModel")


def test_bad_arguments(tiny_clip, flat_folder):
    model, preprocess = tiny_clip
    with pytest.raises(ValueError, match="model and preprocess together"):
        embed_images(flat_folder, model=model)
    with pytest.raises(ValueError, match="precision must be one of"):
        embed_images(flat_folder, model=model, preprocess=preprocess, precision="fp8")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        embed_images(flat_folder, model=model, preprocess=preprocess, batch_size=0)
    with pytest.raises(ValueError, match="device='meta' but the model is on cpu"):
        embed_images(flat_folder, model=model, preprocess=preprocess, device="meta")
    with pytest.raises(TypeError, match="folder path or a torch Dataset"):
        embed_images([Image.new("RGB", (4, 4))], model=model, preprocess=preprocess)
    with pytest.raises(ValueError, match="pretrained must be None with model_name='local-dir:/x'"):
        load_clip_model("local-dir:/x", "some.pt")
    with pytest.raises(TypeError, match="item 0 of images must be a PIL image"):
        embed_images(ListDataset(["not an image"]), model=model, preprocess=preprocess, progress=False)
    with pytest.raises(TypeError, match="item 0 has label 0.5"):
        embed_images(ListDataset([(Image.new("RGB", (4, 4)), 0.5)]), model=model, preprocess=preprocess,
                     progress=False)
    mixed = ListDataset([Image.new("RGB", (4, 4)), (Image.new("RGB", (4, 4)), 1)])
    with pytest.raises(ValueError, match="labels for 1 items and none for 1"):
        embed_images(mixed, model=model, preprocess=preprocess, progress=False)
    with pytest.raises(ValueError, match="images is empty"):
        embed_images(ListDataset([]), model=model, preprocess=preprocess, progress=False)


def test_bad_folders(tiny_clip, tmp_path, flat_folder):
    model, preprocess = tiny_clip
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path / 'nowhere'} does not exist"):
        embed_images(tmp_path / "nowhere", model=model, preprocess=preprocess)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no image files"):
        embed_images(tmp_path / "empty", model=model, preprocess=preprocess)
    (flat_folder / "extra_class").mkdir()
    with pytest.raises(ValueError, match="both image files .* and subfolders"):
        embed_images(flat_folder, model=model, preprocess=preprocess)
    corrupt = tmp_path / "corrupt"
    write_images(corrupt, ["ok.png"], np.random.default_rng(3))
    (corrupt / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=f"could not read image {corrupt / 'broken.png'}"):
        embed_images(corrupt, model=model, preprocess=preprocess, progress=False)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, mmap):
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(13, 9, generator=gen)
    labels = torch.randint(0, 4, (13,), generator=gen, dtype=torch.int32)
    path = tmp_path / "emb.npy"
    save_embeddings(path, emb, labels)
    assert labels_path(path) == tmp_path / "emb.labels.npy" and labels_path(path).exists()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_embeddings(path, mmap=mmap)
    assert torch.equal(loaded.embeddings, emb) and loaded.labels.dtype == torch.int64
    assert torch.equal(loaded.labels, labels.long())
    assert np.array_equal(np.load(path), emb.numpy())  # plain .npy: NumPy reads it
    if mmap:
        loaded.embeddings[0, 0] = 1e3  # copy-on-write: the file is unchanged
        assert torch.equal(load_embeddings(path).embeddings, emb)
    # Saving again without labels removes the stale sidecar.
    save_embeddings(path, emb[:5].double())
    again = load_embeddings(path, mmap=mmap)
    assert again.labels is None and not labels_path(path).exists()
    assert again.embeddings.dtype == torch.float32 and torch.equal(again.embeddings, emb[:5])


def test_bad_embedding_files(tmp_path):
    path = tmp_path / "emb.npy"
    with pytest.raises(FileNotFoundError, match=f"embeddings file {path} does not exist"):
        load_embeddings(path)
    path.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match=f"{path} is not a readable .npy file"):
        load_embeddings(path)
    save_embeddings(path, torch.randn(50, 8))
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    for mmap in (True, False):
        with pytest.raises(ValueError, match=f"{path} is not a readable .npy file"):
            load_embeddings(path, mmap=mmap)
    np.save(path, np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="must hold a 2-D float array"):
        load_embeddings(path)
    save_embeddings(path, torch.randn(6, 3), torch.arange(6))
    np.save(labels_path(path), np.arange(4))
    with pytest.raises(ValueError, match="has 4 labels but .* has 6 rows"):
        load_embeddings(path)
    np.save(labels_path(path), np.ones(6, dtype=np.float32))
    with pytest.raises(ValueError, match="must hold a 1-D integer array"):
        load_embeddings(path)
    with open(path, "wb") as file:  # np.load opens a zip archive whatever the file is called
        np.savez(file, emb=np.zeros((6, 3), dtype=np.float32))
    for mmap in (True, False):
        with pytest.raises(ValueError, match=f"{path} is an .npz archive, not an .npy file"):
            load_embeddings(path, mmap=mmap)


def test_save_refuses_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="must end in .npy"):
        save_embeddings(tmp_path / "emb.pt", torch.randn(3, 2))
    with pytest.raises(ValueError, match="2-D floating-point"):
        save_embeddings(tmp_path / "emb.npy", torch.arange(6).view(3, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_embeddings(tmp_path / "emb.npy", torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        save_embeddings(tmp_path / "emb.npy", torch.randn(3, 2), torch.rand(3))
    with pytest.raises(ValueError, match="2 entries but emb has 3 rows"):
        save_embeddings(tmp_path / "emb.npy", torch.randn(3, 2), torch.arange(2))
    # Finite in float64, Inf once saved as float32.
    with pytest.raises(ValueError, match=r"beyond the float32 range \(\|x\| > 3.4e38\)"):
        save_embeddings(tmp_path / "emb.npy", torch.tensor([[1e300, 1.0], [2.0, 3.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=f"labels must fit int64, as they are saved; got {2**63 + 5}"):
        save_embeddings(tmp_path / "emb.npy", torch.randn(2, 2),
                        torch.from_numpy(np.array([1, 2**63 + 5], dtype=np.uint64)))
    assert not list(tmp_path.iterdir())


def test_import_does_not_import_open_clip():
    code = ("import sys, monoloss_kernels as mk; assert 'open_clip' not in sys.modules; "
            "mk.embeddings.embed_images; assert 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
