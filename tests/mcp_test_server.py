"""An MCP server for the tests, written with the `mcp` package: over stdio (the default) or
streamable HTTP (`http PORT`). Its tools: get_weather (what the tiny tool model calls), a red
square as an image, one that waits, and one that kills the server in the middle of its call.
NOT_MCP_LINES=N: it first prints N lines that aren't MCP to its stdout."""

import io
import os
import sys

from mcp.server.fastmcp import FastMCP, Image

server = FastMCP("test-tools")
SOURCE = os.environ.get("WEATHER_SOURCE", "stdio")


@server.tool()
def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city's name
    """
    return f"18 °C and clear in {city} (from the MCP server over {SOURCE})"


@server.tool()
def red_square() -> Image:
    """A picture of a red square."""
    from PIL import Image as Picture
    buffer = io.BytesIO()
    Picture.new("RGB", (32, 32), (220, 20, 20)).save(buffer, format="PNG")
    return Image(data=buffer.getvalue(), format="png")


@server.tool()
async def wait(seconds: float) -> str:
    """Waits, then says so.

    Args:
        seconds: how long
    """
    import asyncio
    await asyncio.sleep(seconds)
    return f"waited {seconds} s"


@server.tool()
def crash() -> str:
    """Ends the server's process in the middle of the call."""
    os._exit(3)


if __name__ == "__main__":
    for n in range(int(os.environ.get("NOT_MCP_LINES", "0"))):  # (a banner on stdout, as some servers print)
        print(f"Weather server ready ({n})", flush=True)
    if sys.argv[1:2] == ["http"]:
        server.settings.host, server.settings.port = "127.0.0.1", int(sys.argv[2])
        server.run("streamable-http")
    else:
        server.run()
