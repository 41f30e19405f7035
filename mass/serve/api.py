"""The HTTP API's requests and answers, without Ray: parse a body into images and options, turn a model's
outputs into JSON, and name every problem with a 4xx status.

Bodies (``POST /v1/classify``, ``POST /v1/embed``):

- ``multipart/form-data``: one or more ``image`` file fields (or any file field), optional text fields
  ``task`` (one for all images, or one per image in order; empty = routed) and ``top_k``;
- ``application/json``: ``{"images": [{"data": "<base64>", "task": "cars"?}, ...], "top_k": 3?}`` (or
  ``"image": {...}`` for one image; an image may also be the bare base64 string).

Images are decoded with PIL (any format it reads), checked against a byte and a pixel limit, and
preprocessed as the saved model says (:class:`mass.evaluation.data.ClipPreprocess`).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

MAX_TOP_K = 1000


class ApiError(Exception):
    """A bad request: a 4xx status and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        return {"error": {"status": self.status, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry: bytes of the whole body, images, bytes and pixels of one image."""

    max_body_bytes: int = 64 << 20
    max_images: int = 256
    max_image_bytes: int = 16 << 20
    max_image_pixels: int = 40_000_000


@dataclass
class ParsedImage:
    """One decoded, preprocessed image of a request and the task it forces (None: routed)."""

    pixels: torch.Tensor
    task: Optional[str] = None


@dataclass
class Parsed:
    images: list = field(default_factory=list)
    top_k: int = 1


# ---------------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, preprocess, limits: Limits, where: str) -> torch.Tensor:
    """Bytes of an image file → the model's (3, H, W) input; an ApiError naming ``where`` otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{where} is empty")
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{where} is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes per image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > limits.max_image_pixels:
                raise ApiError(413, f"{where} is {w}x{h} pixels; the limit is {limits.max_image_pixels} pixels")
            image.load()
            return preprocess(image)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{where} is too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"{where} is not an image PIL can read (unknown or damaged image format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, f"{where} is not an image PIL can read ({type(exc).__name__}: {exc})") from None


def _task(value, tasks: Sequence[str], where: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{where}: 'task' must be a task name (string) or null, got {json.dumps(value)}")
    if value not in tasks:
        raise ApiError(400, f"{where}: unknown task {value!r}; known tasks: {list(tasks)}")
    return value


def _top_k(value, where: str = "top_k") -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ApiError(400, f"{where} must be an integer >= 1, got {value!r}") from None
    if type(value) is not int or not 1 <= value <= MAX_TOP_K:
        raise ApiError(400, f"{where} must be an integer between 1 and {MAX_TOP_K}, got {json.dumps(value)}")
    return value


def _count(n: int, limits: Limits) -> None:
    if n == 0:
        raise ApiError(400, "the request holds no images (an empty batch)")
    if n > limits.max_images:
        raise ApiError(413, f"the request holds {n} images; the limit is {limits.max_images} per request")


# ---------------------------------------------------------------------------------------------- bodies
def parse_json(body: bytes, preprocess, tasks: Sequence[str], limits: Limits) -> Parsed:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the JSON body must be an object with 'images', got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"images", "image", "top_k"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown} in the JSON body (fields: images, image, top_k)")
    if ("images" in obj) == ("image" in obj):
        raise ApiError(400, "the JSON body needs exactly one of 'images' (a list) or 'image' (one image)")
    items = obj["images"] if "images" in obj else [obj["image"]]
    if not isinstance(items, list):
        raise ApiError(400, f"'images' must be a list, got {type(items).__name__}")
    _count(len(items), limits)
    parsed = Parsed(top_k=_top_k(obj.get("top_k", 1)))
    for i, item in enumerate(items):
        where = f"image {i}"
        if isinstance(item, str):
            item = {"data": item}
        if not isinstance(item, dict) or "data" not in item:
            raise ApiError(400, f"{where} must be a base64 string or an object {{\"data\": base64, \"task\": name}}")
        extra = sorted(set(item) - {"data", "task"})
        if extra:
            raise ApiError(400, f"{where}: unknown field(s) {extra} (fields: data, task)")
        if not isinstance(item["data"], str):
            raise ApiError(400, f"{where}: 'data' must be a base64 string")
        if len(item["data"]) > 4 * math.ceil(limits.max_image_bytes / 3) + 4:
            raise ApiError(413, f"{where} is larger than {limits.max_image_bytes} bytes per image")
        try:
            data = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, f"{where}: 'data' is not valid base64 ({exc})") from None
        task = _task(item.get("task"), tasks, where)
        parsed.images.append(ParsedImage(decode_image(data, preprocess, limits, where), task))
    return parsed


async def parse_form(request, preprocess, tasks: Sequence[str], limits: Limits) -> Parsed:
    """A multipart body (files: images in order; fields ``task`` (one, or one per image) and ``top_k``)."""
    try:
        form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_images + 8)
    except Exception as exc:  # starlette raises MultiPartException / HTTPException for malformed bodies
        raise ApiError(400, f"malformed multipart body ({getattr(exc, 'detail', None) or exc})") from None
    files, task_values, top_k = [], [], 1
    try:
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((key, value))
            elif key == "task":
                task_values.append(value)
            elif key == "top_k":
                top_k = _top_k(value)
            else:
                raise ApiError(400, f"unknown form field {key!r} (fields: image files, task, top_k)")
        _count(len(files), limits)
        if len(task_values) not in (0, 1, len(files)):
            raise ApiError(400, f"give one 'task' field for all images or one per image: {len(task_values)} "
                                f"task fields for {len(files)} images")
        if len(task_values) == 1:
            task_values = task_values * len(files)
        parsed = Parsed(top_k=top_k)
        for i, (key, upload) in enumerate(files):
            where = f"image {i} ({upload.filename or key})"
            data = await upload.read()
            task = _task(task_values[i] if task_values else None, tasks, where)
            parsed.images.append(ParsedImage(decode_image(data, preprocess, limits, where), task))
        return parsed
    finally:
        await form.close()


async def parse_request(request, preprocess, tasks: Sequence[str], limits: Limits) -> Parsed:
    """Parse a classify / embed request by its content type (JSON or multipart); 415 for any other."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise ApiError(413, f"the body is {length} bytes; the limit is {limits.max_body_bytes} bytes")
    if kind == "application/json":
        body = await read_body(request, limits)
        return parse_json(body, preprocess, tasks, limits)
    if kind == "multipart/form-data":
        return await parse_form(request, preprocess, tasks, limits)
    raise ApiError(415, f"unsupported content type {kind or '(none)'!r}: send application/json (base64 images) "
                        f"or multipart/form-data (image files)")


async def read_body(request, limits: Limits) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"the body is larger than {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
