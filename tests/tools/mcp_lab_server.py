"""A small MCP tool server written with the official SDK's ``MCPServer``, for the tests:
``python tests/tools/mcp_lab_server.py [stdio | http PORT]``."""

from __future__ import annotations

import asyncio
import base64
import io
import sys

import numpy as np
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from PIL import Image
from pydantic import BaseModel

server = MCPServer("lab")


class Brightness(BaseModel):
    mean: float
    bright_fraction: float
    width: int
    height: int


@server.tool()
def brightness(image_path: str, threshold: int = 128) -> Brightness:
    """Mean grey value of the image and the fraction of pixels at or above ``threshold``."""
    with Image.open(image_path) as img:
        px = np.asarray(img.convert("L"), dtype=np.float32)
    return Brightness(
        mean=float(px.mean()),
        bright_fraction=float((px >= threshold).mean()),
        width=px.shape[1],
        height=px.shape[0],
    )


@server.tool(structured_output=False)
def inverted(image_base64: str) -> list[object]:
    """The image with its grey values inverted, as an image."""
    from mcp.server.mcpserver import Image as McpImage

    with Image.open(io.BytesIO(base64.b64decode(image_base64))) as img:
        px = 255 - np.asarray(img.convert("L"))
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return ["inverted", McpImage(data=buf.getvalue(), format="png")]


@server.tool()
def broken(reason: str = "calibration file missing") -> str:
    """Always fails."""
    raise ToolError(f"lab tool broke: {reason}")


@server.tool()
async def stuck() -> str:
    """Never answers."""
    await asyncio.sleep(3600)
    return "late"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
