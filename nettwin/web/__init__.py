"""``nettwin ui``: the web view over InfluxDB and the ``twin.models`` topic (aiohttp, plain JS + SVG/canvas).

The server may import anything below ``nettwin``; nothing below imports it.
"""

from nettwin.web.server import WebConfig, make_app, serve

__all__ = ["WebConfig", "make_app", "serve"]
