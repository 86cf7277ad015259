"""Image embeddings with open_clip, and a memory-mappable file format for them.

    model, preprocess = load_clip_model("ViT-B-32", "/models/vit_b_32.safetensors")
    emb, labels = embed_images("images/", model=model, preprocess=preprocess, device="cuda")
    save_embeddings("emb.npy", emb, labels)          # emb.npy (N, d) float32 + emb.labels.npy (N,) int64
    emb, labels = load_embeddings("emb.npy")         # memory-mapped: pages are read as they are used

`images` is a folder or a torch Dataset. A folder with class subfolders
(`images/<class>/<file>`) is read as torchvision's ImageFolder reads it: labels are the
class indices, classes in sorted order; hidden entries (.ipynb_checkpoints, .DS_Store,
`._a.png`) are skipped at every depth, where ImageFolder would take a hidden folder for a
class and a hidden image inside a class folder for a sample. A folder of
image files alone gives no labels; its files are taken in sorted name order.
`list_images(folder)` returns the files in the order of the rows.

Weights (`pretrained`): an open_clip tag downloads from the Hugging Face Hub, which
fails offline. Offline, point at local files instead: a checkpoint file
(`pretrained="/path/model.safetensors"`, .bin/.pt/.pth/.safetensors), a folder with
`open_clip_config.json` and weights (`model_name="local-dir:/path"`), or a Hub repo
already in the local cache (`model_name="hf-hub:org/repo"` with HF_HUB_OFFLINE=1 set
before Python starts). With a file and a plain model name, images are preprocessed with
that model name's default resize and normalisation (open_clip #1068).

Only the stable open_clip calls are used (`create_model_and_transforms`,
`add_model_config`); open_clip is imported on first use, never by `import monoloss_kernels`.
"""

import contextlib
import operator
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._progress import progress_bar

CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
OFFLINE_HINT = (
    "open_clip tags download weights from the Hugging Face Hub. Offline, pass a local checkpoint "
    "file as pretrained (.bin, .pt, .pth or .safetensors), or model_name='local-dir:/path/to/folder' "
    "(open_clip_config.json and weights), or model_name='hf-hub:org/repo' with the repo in the local "
    "Hugging Face cache and HF_HUB_OFFLINE=1 set before Python starts"
)


class ImageEmbeddings(NamedTuple):
    embeddings: Tensor  # (N, d) float32, on the CPU
    labels: Tensor | None  # (N,) int64 class indices, or None when the images carry no labels


class ImageList(NamedTuple):
    paths: list  # the image files, in the order of the rows (list of Path)
    labels: list | None  # class index of each file (class-subfolder layout), else None
    classes: list | None  # class names, sorted; labels index into them


class ModelLoadError(RuntimeError):
    """An open_clip model that could not be created or whose weights could not be
    loaded (an unknown name, a tag that cannot be downloaded); the message says what to
    do, offline included."""


def load_clip_model(model_name: str, pretrained: str | os.PathLike | None = None, *, device="cpu",
                    precision: str = "fp32"):
    """(model in eval mode, preprocess) for an open_clip model.

    Args:
        model_name: an open_clip model name ("ViT-B-32", or one registered with
            `open_clip.add_model_config`), "local-dir:/path" or "hf-hub:org/repo".
        pretrained: None (random weights: a warning says so), an open_clip tag (downloads),
            or a local checkpoint file. Must be None with a "local-dir:"/"hf-hub:" model_name.
        device: where the model lives.
        precision: the weights' dtype, "fp32", "fp16" or "bf16" (`embed_images` keeps fp32
            weights and uses autocast for its own `precision`).

    Raises FileNotFoundError for a checkpoint path that does not exist, ValueError for a
    file that does not load into the model, ModelLoadError (a RuntimeError; with how to
    work offline) when a tag cannot be loaded or the model cannot be created.
    """
    import open_clip

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name must be a non-empty str, got {model_name!r}")
    has_schema = model_name.startswith(("local-dir:", "hf-hub:"))
    if pretrained is not None and has_schema:
        raise ValueError(
            f"pretrained must be None with model_name={model_name!r}: the weights come from that source"
        )
    checkpoint = _checkpoint_path(pretrained)
    if pretrained is None and not has_schema:
        warnings.warn(
            f"open_clip model {model_name!r} has random weights (pretrained=None); its embeddings carry no "
            "meaning. Pass a tag or a local checkpoint file as pretrained.",
            stacklevel=2,
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(checkpoint) if checkpoint else pretrained, precision=precision,
            device=device,
        )
    except Exception as error:  # noqa: BLE001 -- every failure is re-raised with what to do about it
        cause = f"{type(error).__name__}: {error}"
        if checkpoint is not None:
            raise ValueError(
                f"pretrained checkpoint {checkpoint} could not be loaded into open_clip model {model_name!r}; "
                f"is it a checkpoint of this model? {cause}"
            ) from error
        if pretrained is not None or has_schema:
            source = f"pretrained={pretrained!r}" if pretrained is not None else "its source"
            raise ModelLoadError(f"could not load open_clip model {model_name!r} with {source}: {cause}. "
                                 f"{OFFLINE_HINT}") from error
        raise ModelLoadError(f"could not create open_clip model {model_name!r}: {cause}") from error
    return model.eval(), preprocess


def list_images(folder: str | os.PathLike) -> ImageList:
    """The images of a folder, in the order `embed_images` embeds them (see the module docstring)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"images must be a folder or a torch Dataset; {folder} is a file")
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    class_dirs = [entry for entry in entries if entry.is_dir()]
    files = sorted(entry for entry in entries if entry.is_file() and entry.suffix.lower() in IMG_EXTENSIONS)
    if class_dirs and files:
        raise ValueError(
            f"image folder {folder} has both image files ({files[0].name}, ...) and subfolders "
            f"({class_dirs[0].name}, ...): use either class subfolders (labels) or a flat folder of images"
        )
    if class_dirs:
        # ImageFolder's listing with the visible class folders only (it would take a hidden
        # one, such as .ipynb_checkpoints, for class 0 and shift every label).
        classes = sorted(entry.name for entry in class_dirs)

        def is_visible_image(path: str) -> bool:
            # make_dataset walks each class folder whole: without this it takes macOS's
            # `._a.png` resource forks and `.ipynb_checkpoints/*-checkpoint.png` as samples.
            parts = Path(path).relative_to(folder).parts
            return not any(part.startswith(".") for part in parts) and Path(path).suffix.lower() in IMG_EXTENSIONS

        # Raises, naming the class, for a class folder without images.
        samples = make_dataset(str(folder), {name: index for index, name in enumerate(classes)},
                               is_valid_file=is_visible_image)
        return ImageList([Path(path) for path, _ in samples], [label for _, label in samples], classes)
    if not files:
        raise ValueError(f"image folder {folder} has no image files ({', '.join(IMG_EXTENSIONS)})")
    return ImageList(files, None, None)


def embed_images(images, *, model_name: str = "ViT-B-32", pretrained: str | os.PathLike | None = None,
                 model=None, preprocess=None, device=None, batch_size: int = 64, precision: str = "fp32",
                 num_workers: int = 0, progress: bool = True) -> ImageEmbeddings:
    """Embeds images with an open_clip image encoder: `ImageEmbeddings(embeddings, labels)`.

    Args:
        images: a folder (class subfolders give labels; see the module docstring), or a
            torch Dataset whose items are PIL images or (PIL image, int label) pairs; a
            tensor in place of a PIL image is taken as already preprocessed (3, H, W).
        model_name, pretrained: the model to load with `load_clip_model` when `model` is None.
        model, preprocess: an open_clip model and its preprocessing transform (both or neither).
        device: where the model runs; default the given model's device, else the CPU.
        batch_size: images per forward pass (the embeddings do not depend on it beyond float rounding).
        precision: "fp32", or "fp16"/"bf16" for autocast (mixed precision; weights stay as they are).
        num_workers: DataLoader processes decoding and preprocessing images.
        progress: show a progress bar (tqdm, when installed and stderr is a terminal).

    Returns embeddings (N, d) float32 on the CPU — `model.encode_image`, not normalised —
    and labels (N,) int64, or None when the images carry no labels.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if (model is None) != (preprocess is None):
        raise ValueError("pass model and preprocess together (both from load_clip_model), or neither")
    if model is None:
        model, preprocess = load_clip_model(model_name, pretrained, device=device or "cpu")
    model_device = next(model.parameters()).device
    # Resolved through an empty tensor, so that "cuda" becomes "cuda:0" as parameters report it.
    device = model_device if device is None else torch.empty(0, device=device).device
    if device != model_device:
        raise ValueError(f"device={str(device)!r} but the model is on {model_device}; move the model, or leave "
                         "device=None to use the model's")

    if isinstance(images, (str, os.PathLike)):
        image_list = list_images(images)
        dataset = _Preprocessed(_ImageFiles(image_list.paths, image_list.labels), preprocess, image_list.paths)
    elif isinstance(images, torch.utils.data.Dataset):
        dataset = _Preprocessed(images, preprocess)
    else:
        raise TypeError(f"images must be a folder path or a torch Dataset, got {type(images).__name__}")
    num_images = len(dataset)
    if num_images == 0:
        raise ValueError("images is empty: nothing to embed")

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    embeddings, labels, row = None, [], 0
    autocast = contextlib.nullcontext() if precision == "fp32" else \
        torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    # In eval mode (no dropout or stochastic depth: the same image, the same embedding),
    # the caller's model handed back in the mode it came in.
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            for pixels, batch_labels in progress_bar(loader, desc="embedding images",
                                                     enabled=None if progress else False, total=len(loader)):
                batch = model.encode_image(pixels.to(device, non_blocking=True)).float().cpu()
                if embeddings is None:  # d is known from the first batch; all rows go into one buffer
                    embeddings = torch.empty(num_images, batch.shape[1], dtype=torch.float32)
                embeddings[row:row + batch.shape[0]] = batch
                row += batch.shape[0]
                labels.extend(batch_labels)
    finally:
        model.train(was_training)
    if embeddings is None or row != num_images:
        raise RuntimeError(f"images yielded {row} items but reported len() = {num_images}")
    if not bool(torch.isfinite(embeddings).all()):
        raise FloatingPointError(
            f"the model produced NaN/Inf embeddings (precision={precision!r}); try precision='fp32'"
        )
    return ImageEmbeddings(embeddings, _labels_tensor(labels))


def save_embeddings(path: str | os.PathLike, emb: Tensor, labels: Tensor | None = None) -> None:
    """Writes emb (N, d) as float32 to `path` (.npy) and labels (N,) as int64 to the
    sidecar `<path stem>.labels.npy`; both are plain NumPy .npy files (`np.load` reads
    them). A sidecar left by an earlier save is removed when labels is None. Files are
    written to a temporary name first, so an interrupted save never leaves a truncated file."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"embeddings path must end in .npy, got {path}")
    if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"emb must be a 2-D floating-point tensor (N, d), got {_describe(emb)}")
    emb32 = emb.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(emb32).all()):  # after the cast: float64 values past 3.4e38 overflow to Inf
        if bool(torch.isfinite(emb).all()):
            raise ValueError("emb has values beyond the float32 range (|x| > 3.4e38), which is how it is saved; "
                             "rescale emb (cosine similarity does not depend on the scale of a row)")
        raise ValueError("emb contains NaN or Inf values")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D integer tensor (N,), got {_describe(labels)}")
        if labels.shape[0] != emb.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but emb has {emb.shape[0]} rows")
        if labels.dtype == torch.uint64 and labels.numel():  # torch has no max() for uint64; NumPy has
            largest = int(labels.detach().cpu().numpy().max())
            if largest > 2**63 - 1:
                raise ValueError(f"labels must fit int64, as they are saved; got {largest}")
    arrays = {path: emb32.numpy()}
    if labels is not None:
        arrays[labels_path(path)] = labels.detach().to("cpu", torch.int64).numpy()
    for target, array in arrays.items():
        with open(f"{target}.tmp", "wb") as file:
            np.save(file, np.ascontiguousarray(array), allow_pickle=False)
    for target in arrays:
        os.replace(f"{target}.tmp", target)
    if labels is None:
        labels_path(path).unlink(missing_ok=True)


def load_embeddings(path: str | os.PathLike, mmap: bool = True) -> ImageEmbeddings:
    """Reads what `save_embeddings` wrote: `ImageEmbeddings(embeddings (N, d) float32,
    labels (N,) int64 or None)`. With mmap=True the embeddings are memory-mapped
    copy-on-write (pages are read when used; writes stay in memory, the file is never
    changed). Values are not scanned here; `monoscore` refuses NaN/Inf when it reads them."""
    path = Path(path)
    array = _load_npy(path, mmap)
    if array.ndim != 2 or array.dtype.kind != "f":
        raise ValueError(f"embeddings file {path} must hold a 2-D float array (N, d), got {array.dtype} {array.shape}")
    embeddings = torch.from_numpy(array if array.dtype == np.float32 else array.astype(np.float32))
    labels = None
    if labels_path(path).exists():
        label_array = _load_npy(labels_path(path), mmap=False)
        if label_array.ndim != 1 or label_array.dtype.kind not in "iu":
            raise ValueError(f"labels file {labels_path(path)} must hold a 1-D integer array (N,), "
                             f"got {label_array.dtype} {label_array.shape}")
        if label_array.shape[0] != array.shape[0]:
            raise ValueError(f"labels file {labels_path(path)} has {label_array.shape[0]} labels but {path} has "
                             f"{array.shape[0]} rows")
        labels = torch.from_numpy(label_array.astype(np.int64))
    return ImageEmbeddings(embeddings, labels)


def labels_path(path: str | os.PathLike) -> Path:
    """The labels sidecar of an embeddings file: emb.npy -> emb.labels.npy."""
    path = Path(path)
    return path.with_name(f"{path.stem}.labels.npy")


def _checkpoint_path(pretrained) -> Path | None:
    """The checkpoint file `pretrained` names, or None when it is None or a tag."""
    if pretrained is None:
        return None
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be None, a tag or a file path, got {type(pretrained).__name__}")
    path = Path(pretrained)
    looks_like_path = isinstance(pretrained, os.PathLike) or os.sep in str(pretrained) \
        or path.suffix in CHECKPOINT_SUFFIXES
    if path.is_dir():
        raise IsADirectoryError(
            f"pretrained {path} is a folder; for a folder with open_clip_config.json and weights pass "
            f"model_name='local-dir:{path}' and pretrained=None"
        )
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"pretrained checkpoint {path} is empty")
        return path
    if looks_like_path:
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    return None


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    try:
        array = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy file (truncated, or another format?): {error}") from error
    if not isinstance(array, np.ndarray):  # np.load opens a zip archive (np.savez) whatever its name
        array.close()
        raise ValueError(f"{path} is an .npz archive, not an .npy file: save one array with np.save")
    return array


class _ImageFiles(torch.utils.data.Dataset):
    """PIL images (RGB) of a list of files, with their labels when known."""

    def __init__(self, paths, labels):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB")
        return rgb if self.labels is None else (rgb, self.labels[index])


class _Preprocessed(torch.utils.data.Dataset):
    """(preprocessed image tensor, label or None) from any accepted item form."""

    def __init__(self, source, preprocess, paths=None):
        self.source, self.preprocess, self.paths = source, preprocess, paths

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            item = self.source[index]
        except Exception as error:  # noqa: BLE001 -- name the file that failed
            if self.paths is None:
                raise
            raise ValueError(f"could not read image {self.paths[index]}: {type(error).__name__}: {error}") from error
        image, label = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        if isinstance(image, Tensor):
            if image.dim() != 3 or not image.is_floating_point():
                raise TypeError(f"item {index} is a tensor of shape {tuple(image.shape)}, dtype {image.dtype}; a "
                                "tensor must be an already preprocessed float (3, H, W) image")
            pixels = image
        elif _is_pil_image(image):
            pixels = self.preprocess(image)
        else:
            raise TypeError(f"item {index} of images must be a PIL image or a (PIL image, int label) pair, "
                            f"got {type(item).__name__}")
        if label is not None:
            try:
                label = operator.index(label)
            except TypeError:
                raise TypeError(f"item {index} has label {label!r}; labels must be integers") from None
        return pixels, label


def _is_pil_image(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _collate(items):
    return torch.stack([pixels for pixels, _ in items]), [label for _, label in items]


def _labels_tensor(labels: list) -> Tensor | None:
    missing = sum(label is None for label in labels)
    if missing == len(labels):
        return None
    if missing:
        raise ValueError(f"images yielded labels for {len(labels) - missing} items and none for {missing}; "
                         "give every item a label or none")
    return torch.tensor(labels, dtype=torch.int64)


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
