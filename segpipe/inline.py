"""Markdown reports with their images inlined, for viewers that get only the text (the Prefect UI, a chat message).

Light on purpose (Pillow only): the flow's process publishes reports without importing matplotlib or pandas.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


# A Prefect artifact travels whole inside the server's `artifact-collection.created` event: two reports with 1.3 MB
# grids stalled a server's event pipeline for minutes (a `--watch` never saw the run finish). Larger photos and plots
# are inlined as JPEG previews within this budget; the full files stay in the artifact store.
INLINE_BYTES = 80_000


def preview_jpeg(path: Path, max_bytes: int = INLINE_BYTES, quality: int = 80) -> bytes:
    """The image as a JPEG of at most max_bytes: the full size if it fits, else scaled down step by step."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im.split()[-1])
            im = flat
        else:
            im = im.convert("RGB")
    scale = 1.0
    while True:
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        buf = io.BytesIO()
        (im if scale == 1.0 else im.resize(size, Image.LANCZOS)).save(buf, "JPEG", quality=quality, optimize=True)
        if buf.tell() <= max_bytes or max(size) <= 64:
            return buf.getvalue()
        scale *= 0.8


def embed_images(markdown: str, base_dir: Path, max_bytes: int = 2_000_000, inline_bytes: int = INLINE_BYTES) -> str:
    """`markdown` with its relative image links replaced by base64 `data:` URIs, for viewers that get only the text.

    A report's `![alt](plot.png)` resolves only next to the file; an orchestrator UI, a chat message or an e-mail
    shows a broken image. An image over `inline_bytes` is inlined as a JPEG preview that fits (see INLINE_BYTES).
    Absolute URLs, missing files and images over `max_bytes` keep their link.
    """
    def inline(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2)
        path = Path(base_dir) / target
        mime = IMAGE_MIME.get(path.suffix.lower())
        if "://" in target or target.startswith("data:") or mime is None or not path.is_file() \
                or path.stat().st_size > max_bytes:
            return m.group(0)
        data = path.read_bytes()
        if len(data) > inline_bytes and mime != "image/svg+xml":
            data, mime = preview_jpeg(path, inline_bytes), "image/jpeg"
        return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"

    return _IMAGE_LINK.sub(inline, markdown)
