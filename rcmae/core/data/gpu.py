"""The GPU decode path of the pretraining augmentation (``data.pipeline=gpu``): MAE's crop + flip of
:mod:`rcmae.core.data.transforms`, with the JPEG decoding moved from the data-loader workers to the GPU.

What runs where:

- data-loader workers (CPU), :class:`EncodedRandomResizedCrop`: read the file's bytes, read the JPEG
  header, draw the crop box and flip (the same random numbers, in the same order, as the ``fast``
  pipeline's :class:`~rcmae.core.data.transforms.FastRandomResizedCrop`, so a seeded sample is cropped
  identically by every pipeline) and hand over the undecoded bytes. Files the GPU decoder cannot take
  (anything but a baseline or progressive 8-bit YCbCr / grayscale JPEG: PNG, CMYK, lossless, ...) are
  decoded here by ``FastRandomResizedCrop`` itself; :func:`collate_encoded` packs a batch's bytes into
  one buffer (one shared-memory segment per batch: per-sample tensors cost the main process ~60 ms per
  256 samples to receive, measured on a 2-core machine);
- the training process (GPU), :func:`decode_on_device`: one batched nvJPEG call
  (``torchvision.io.decode_jpeg`` on a list) decodes the batch, then each image is cropped, flipped and
  resized there (antialiased bicubic in PIL's two passes, in float32; rounded back to uint8).

Why: decoding is most of the input pipeline's cost, and nvJPEG (the A100 / H100 / H200 hardware JPEG
decoder, batched) decodes ~8,000 ImageNet images/s on an H200 node where PIL manages ~300 per CPU core;
a node's cores cannot feed its GPUs otherwise. The crops and flips are the ``fast`` pipeline's; the
pixels differ from it by rounding only (nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's,
and the resize runs in float32, not fixed point), except that the ``fast`` pipeline decodes large crops
at a reduced DCT scale, which this one does not need.

Without CUDA there is no point (nvJPEG is CUDA-only; on the CPU ``decode_on_device`` works, for tests,
but is slower than the ``fast`` pipeline's reduced decoding): the caller falls back to the CPU
``fast`` pipeline (the training code does). Keep the data loader's ``pin_memory`` off for this
pipeline: the decoder reads the bytes from ordinary host memory, and pinning copies every sample.
"""
from __future__ import annotations

import io
from functools import cache
from typing import NamedTuple

import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from rcmae.core.data.transforms import FastRandomResizedCrop, crop_and_flip

GPU_FRAMES = {(0xC0, 8), (0xC2, 8)}  # (SOF marker, bits): 8-bit baseline or progressive, what nvJPEG decodes
GPU_COLORSPACES = {"YCbCr", "Gray"}  # simplejpeg's names; RGB-coded (Adobe), CMYK, YCCK files are not
GPU_SUBSAMPLINGS = {"444", "422", "420", "440", "411", "Gray"}  # nvJPEG fails a batch on other samplings
JPEG_EOI = b"\xff\xd9"


class EncodedSample(NamedTuple):
    """One sample as a worker hands it over: ``data``, the JPEG's bytes (1-D uint8, CPU), to decode on
    the device, or None when the worker decoded the file itself into ``pixels`` ((3, size, size)
    uint8). ``box`` (top, left, height, width, in full-resolution pixels) and ``flip`` are the drawn
    crop and flip (for ``pixels`` already applied)."""

    data: torch.Tensor | None
    box: tuple[int, int, int, int]
    flip: bool
    pixels: torch.Tensor | None


def jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG's frame header, walking the marker segments before it;
    None when there is no frame header before the first scan (not a JPEG, or a damaged one)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker in (0xD9, 0xDA):  # end of image or a scan before any frame header
            return None
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            return marker, data[pos + 4]
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def gpu_decodable_shape(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a file nvJPEG decodes as the CPU would (a complete baseline or progressive
    8-bit YCbCr / grayscale JPEG); None for the rest, decoded on the CPU. A file that does not end with
    the end-of-image marker (truncated, or padded) goes to the CPU decoder too, which skips a truncated
    file as the ``fast`` pipeline does, where nvJPEG would fail the whole batch."""
    try:
        height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # not a JPEG, or one libjpeg-turbo cannot read
        return None
    if (colorspace not in GPU_COLORSPACES or subsampling not in GPU_SUBSAMPLINGS
            or bytes(data[-2:]) != JPEG_EOI or jpeg_frame(data) not in GPU_FRAMES):
        return None
    return height, width


class EncodedRandomResizedCrop:
    """MAE's crop + flip, drawn in the data-loader worker and applied on the device
    (:func:`decode_on_device`). Takes the file's bytes (``decodes``: see
    :class:`rcmae.core.data.SeededImages`), returns an :class:`EncodedSample`. Draws exactly the random
    numbers ``FastRandomResizedCrop`` draws, from torch alone."""

    decodes = True

    def __init__(self, size: int, min_scale: float):
        self.size, self.min_scale = size, min_scale
        self.on_cpu = FastRandomResizedCrop(size, min_scale)

    def __call__(self, data: bytes) -> EncodedSample:
        shape = gpu_decodable_shape(data)  # decided before drawing: both branches draw the same numbers
        if shape is None:
            return self.decoded_on_cpu(data)
        height, width = shape
        box, flip = crop_and_flip(width, height, self.min_scale)
        return EncodedSample(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip, None)

    def decoded_on_cpu(self, data: bytes) -> EncodedSample:
        """The ``fast`` pipeline's pixels of a file nvJPEG cannot take, with the box and flip its draws
        gave (drawn once more from the same generator state, then the state is rewound for it)."""
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
        state = torch.get_rng_state()
        box, flip = crop_and_flip(width, height, self.min_scale)
        torch.set_rng_state(state)
        return EncodedSample(None, box, flip, self.on_cpu(data))


def collate_encoded(batch) -> tuple[list[EncodedSample], torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for ``(EncodedSample, label, skipped)`` items: the samples as a list,
    labels and skipped counts as int64 tensors (as ``default_collate`` makes them). The samples' bytes
    become views of one buffer, so a worker sends one shared-memory segment per batch, not one per
    sample."""
    samples, labels, skipped = zip(*batch)
    encoded = [s.data for s in samples if s.data is not None]
    if encoded:
        buffer = torch.cat(encoded)
        views = iter(buffer.split([d.numel() for d in encoded]))
        samples = [s if s.data is None else s._replace(data=next(views)) for s in samples]
    return list(samples), torch.tensor(labels, dtype=torch.int64), torch.tensor(skipped, dtype=torch.int64)


@cache
def decoder_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream that only ever allocates the decoder's outputs (see :func:`decode_jpegs`)."""
    return torch.cuda.Stream(device)


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The JPEGs ``data`` decoded to (3, H, W) uint8 RGB on ``device``, in one batched call.

    On CUDA the call runs with a stream of its own current: torchvision allocates the outputs on the
    current stream but nvJPEG writes them from another one without waiting for it, so on the training
    stream it could be handed (and overwrite) memory that queued kernels still read. On the decoder's
    idle stream a block is handed out only once its earlier users are done (``record_stream``); the
    training stream then waits for the decode, on the device, not the host."""
    if device.type != "cuda":
        return decode_list_or_each(data, device)
    consumer = torch.cuda.current_stream(device)
    stream = decoder_stream(device)
    with torch.cuda.stream(stream):
        images = decode_list_or_each(data, device)
    consumer.wait_stream(stream)
    for image in images:
        image.record_stream(consumer)
    return images


def decode_list_or_each(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One ``decode_jpeg`` call on the list (torchvision >= 0.19, CPU and CUDA); one call per image with
    a torchvision whose decoder takes a single tensor (there the list raises before decoding anything;
    a damaged file raises again, from its own call)."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except (TypeError, RuntimeError):
        return [decode_jpeg(d, mode=ImageReadMode.RGB, device=device) for d in data]


def crop_flip_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """(3, H, W) uint8 -> the crop ``box`` (top, left, height, width), flipped on request, resized to
    (3, size, size) with antialiased bicubic, as float32 holding whole numbers in 0-255.

    PIL (and torch's uint8 kernel, the ``fast`` pipeline's) resizes in two passes, horizontal then
    vertical, rounding and clipping to uint8 in between; at sharp edges that clipping of the bicubic's
    overshoot moves pixels by up to ~9 levels, so it is done here too. The passes run in float32
    because CUDA's antialiased bicubic takes no uint8; the CPU takes the same path, so tests cover it."""
    top, left, height, width = box
    if top < 0 or left < 0 or top + height > image.shape[1] or left + width > image.shape[2]:
        raise ValueError(f"crop box {box} outside the decoded {tuple(image.shape[1:])} image")
    crop = image[:, top:top + height, left:left + width]
    if flip:
        crop = crop.flip(-1)
    rows = F.interpolate(crop[None].float(), size=(height, size), mode="bicubic", antialias=True)
    rows = rows.round_().clamp_(0, 255)
    return F.interpolate(rows, size=(size, size), mode="bicubic", antialias=True)[0]


def decode_on_device(samples: list[EncodedSample], size: int, device: torch.device) -> torch.Tensor:
    """A batch of :class:`EncodedSample` as (N, 3, size, size) uint8 on ``device``: the JPEGs decoded
    in one batched call, each cropped, flipped and resized there (one interpolate per sample: the crops
    differ in size); the worker-decoded ``pixels`` copied into their places. No host synchronisation
    beyond what the decoder does itself."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    batch = torch.empty(len(samples), 3, size, size, dtype=torch.float32, device=device)
    on_device = [i for i, s in enumerate(samples) if s.pixels is None]
    if on_device:
        images = decode_jpegs([samples[i].data for i in on_device], device)
        for i, image in zip(on_device, images):
            batch[i] = crop_flip_resize(image, samples[i].box, size, samples[i].flip)
    for i, sample in enumerate(samples):
        if sample.pixels is not None:
            batch[i] = sample.pixels.to(device, non_blocking=True)
    return batch.round_().clamp_(0, 255).to(torch.uint8)
