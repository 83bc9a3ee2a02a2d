"""The investigators' web console (`dedup console`): a Starlette application that talks to a
running `dedup serve` only as a gRPC client, with each person's own bearer token and open
case on every call, so it adds no way into the data the server does not already audit.

Needs the `console` extra (Starlette, Jinja2, python-multipart, uvicorn)."""
