"""The edge: where traffic for a reserved IP lands, sent on to whoever holds it.

On DigitalOcean the network routes the reserved IP to the droplet it points at, and it
takes a moment to converge after a move. The edge plays that network: every request goes
to the web service of the droplet that held the IP `propagation_delay` seconds ago, and
the answer says which droplet that was (`x-fip-droplet`), so a `curl` through the edge
shows a failover happen. It reads the same state as the API, in the same process.
One edge app serves one address family: the IPv4 edge routes by the reserved IPv4, the
IPv6 edge (listening on `::1`, say) by the reserved IPv6, so a client can watch both move.
"""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .emulator import Emulator
from .state import Family

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
DROPLET_HEADER = "x-fip-droplet"


def build_edge_app(
    emulator: Emulator, client: httpx.AsyncClient, family: Family = "ipv4"
) -> Starlette:
    """An ASGI app forwarding everything through `client` (which the caller closes), by
    who holds the emulator's edge address of `family`."""

    async def forward(request: Request) -> Response:
        ip = emulator.edge_address(family)
        if ip is None:
            what = "reserved IP" if family == "ipv4" else "reserved IPv6"
            return PlainTextResponse(f"the emulator has no {what}\n", status_code=503)
        as_of = emulator.clock() - emulator.settings.propagation_delay
        holder = emulator.state.holder_at(ip, as_of)
        if holder is None:
            return PlainTextResponse(f"no droplet holds reserved IP {ip}\n", status_code=503)
        droplet = emulator.state.droplets.get(holder)
        if droplet is None:
            return PlainTextResponse(f"droplet {holder} was destroyed\n", status_code=502)
        web_url = droplet.web_url
        if web_url is None:
            return PlainTextResponse(
                f"droplet {holder} holds {ip} but has no web service configured\n",
                status_code=502,
            )
        target = web_url.rstrip("/") + request.url.path
        if request.url.query:
            target += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        client_host = request.client.host if request.client else ""
        headers.append(("x-forwarded-for", client_host))
        headers.append(("x-forwarded-host", request.headers.get("host", ip)))
        upstream = client.build_request(
            request.method,
            target,
            headers=headers,
            content=await request.body(),
            timeout=emulator.settings.edge_timeout,
        )
        try:
            response = await client.send(upstream, stream=True)
            try:
                body = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except httpx.HTTPError as error:
            return PlainTextResponse(
                f"droplet {holder} web service at {web_url} failed: "
                f"{type(error).__name__}: {error}\n",
                status_code=502,
            )
        reply = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]
        reply.append((DROPLET_HEADER, str(holder)))
        # A HEAD answer has no body but announces the GET's length; keep the upstream's.
        length = response.headers.get("content-length") if request.method == "HEAD" else None
        reply.append(("content-length", length if length is not None else str(len(body))))
        out = Response(body, status_code=response.status_code)
        out.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply]
        return out

    return Starlette(routes=[Route("/{path:path}", forward, methods=ALL_METHODS)])
